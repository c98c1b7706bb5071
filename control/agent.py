"""`flannelette run`: the node agent (flanneld's job), on uvloop.

Start-up, in order: pick the external interface; find the network config in
etcd (``--etcd-api auto``: the key space that holds it); hold a lease; write
subnet.env; start the VXLAN engine; program routes; serve /healthz, /readyz,
/status and /metrics. Then four tasks run side by side: the peer watch, the
lease keeper, the peer applier (routes, then engine) and the route monitor.
SIGTERM/SIGINT stop it cleanly and keep the lease, so a restart keeps the
subnet. Bad flags and configs end it with one clear line; an unreachable etcd
is retried with backoff, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from control import subnetenv
from control.backoff import Backoff
from control.config import NetworkConfig, parse_config
from control.errors import (
    ConfigError,
    ConfigNotFound,
    ControlError,
    FlagError,
    RegistryUnavailable,
    ResyncRequired,
)
from control.iface import ExternalInterface, find_interface
from control.keeper import LeaseKeeper
from control.lease import LEASE_TTL, Lease, LeaseAttrs
from control.registry import EtcdOptions, Registry, discover
from control.watch import PeerMap, PeerWatcher
from dataplane.errors import DataplaneError
from dataplane.fib import Path, Peer
from dataplane.wire import mac_to_str as mac_to_text

log = logging.getLogger("flannelette.agent")

DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"


# ---- flags ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AgentOptions:
    """Every flag of `flannelette run`, after FLANNELD_* defaults were applied."""

    etcd: EtcdOptions
    etcd_api: str = "auto"
    iface: tuple[str, ...] = ()
    public_ip: ipaddress.IPv4Address | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    renew_margin: float = 3600.0  # seconds
    lease_ttl: int = LEASE_TTL
    ip_masq: bool = False
    healthz_ip: str = "127.0.0.1"
    healthz_port: int = 9480
    log_level: str = "info"
    log_format: str = "text"
    watch_timeout: float = 10.0
    engine_offload: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


def _env(environ: Mapping[str, str], flag: str) -> str | None:
    return environ.get("FLANNELD_" + flag.upper().replace("-", "_"))


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """flanneld's flag names; each default comes from FLANNELD_<FLAG> if set."""
    p = _Parser(prog="flannelette run", description="Run the flannelette node agent "
                "(flanneld's flags; each also from FLANNELD_<FLAG>, e.g. FLANNELD_IFACE).")

    def d(flag: str, default: str) -> str:
        return _env(environ, flag) or default

    p.add_argument("--etcd-endpoints", default=d("etcd-endpoints", DEFAULT_ENDPOINTS),
                   help="comma-separated etcd endpoints")
    p.add_argument("--etcd-prefix", default=d("etcd-prefix", "/coreos.com/network"))
    p.add_argument("--etcd-api", default=d("etcd-api", "auto"), choices=("auto", "v2", "v3"),
                   help="etcd API; auto = the one whose key space holds the config")
    for name in ("cafile", "certfile", "keyfile", "username", "password"):
        p.add_argument(f"--etcd-{name}", default=d(f"etcd-{name}", ""))
    p.add_argument("--iface", action="append", default=None,
                   help="interface name or address for inter-host traffic (repeatable)")
    p.add_argument("--public-ip", default=d("public-ip", ""),
                   help="the address other nodes reach us at (default: --iface's address)")
    p.add_argument("--subnet-file", default=d("subnet-file", "/run/flannel/subnet.env"))
    p.add_argument("--subnet-lease-renew-margin", type=float,
                   default=float(d("subnet-lease-renew-margin", "60")),
                   help="minutes before expiry to renew the lease (fractions allowed)")
    p.add_argument("--subnet-lease-ttl", type=int, default=int(d("subnet-lease-ttl",
                                                                  str(LEASE_TTL))),
                   help="lease TTL in seconds (flannel: 86400; shorter only for tests)")
    p.add_argument("--ip-masq", action="store_true",
                   default=_truthy(d("ip-masq", "false")),
                   help="masquerade traffic leaving the overlay network")
    p.add_argument("--healthz-ip", default=d("healthz-ip", "127.0.0.1"))
    p.add_argument("--healthz-port", type=int, default=int(d("healthz-port", "9480")),
                   help="port of /healthz, /readyz, /status, /metrics; 0 = off")
    p.add_argument("--log-level", default=d("log-level", "info"),
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    p.add_argument("--log-format", default=d("log-format", "text"), choices=("text", "json"),
                   help="text lines or JSON lines (one object per line)")
    p.add_argument("--engine-offload", default=d("engine-offload", "off"), choices=("on", "off"),
                   help="TUN TSO + UDP GSO/GRO with 64 KB super-packets in the userspace "
                        "engine (fastest between flannelette nodes; see docs/benchmarks.md)")
    p.add_argument("--watch-timeout", type=float, default=float(d("watch-timeout", "10")),
                   help=argparse.SUPPRESS)
    p.add_argument("--etcd-timeout", type=float, default=float(d("etcd-timeout", "5")),
                   help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> AgentOptions:
    """Flags (and FLANNELD_* variables) -> AgentOptions; FlagError on anything unusable."""
    try:
        ns = build_parser(environ).parse_args(list(argv))
    except ValueError as exc:  # a FLANNELD_* number that is not one
        raise FlagError(f"bad FLANNELD_* value: {exc}") from None
    endpoints = tuple(e.strip() for e in ns.etcd_endpoints.split(",") if e.strip())
    etcd = EtcdOptions(endpoints=endpoints, prefix=ns.etcd_prefix, cafile=ns.etcd_cafile,
                       certfile=ns.etcd_certfile, keyfile=ns.etcd_keyfile,
                       username=ns.etcd_username, password=ns.etcd_password,
                       timeout=ns.etcd_timeout)
    etcd.hosts()  # validates the endpoints
    iface = ns.iface if ns.iface is not None else [
        s for s in (_env(environ, "iface") or "").split(",") if s]
    public_ip = None
    if ns.public_ip:
        try:
            public_ip = ipaddress.IPv4Address(ns.public_ip)
        except ValueError:
            raise FlagError(f"--public-ip must be an IPv4 address, got {ns.public_ip!r}"
                            ) from None
    if not 0 <= ns.healthz_port <= 65535:
        raise FlagError(f"--healthz-port must be in 0..65535, got {ns.healthz_port}")
    margin = ns.subnet_lease_renew_margin * 60.0
    if ns.subnet_lease_ttl < 5:
        raise FlagError(f"--subnet-lease-ttl must be at least 5 s, got {ns.subnet_lease_ttl}")
    if not 0 < margin < ns.subnet_lease_ttl:
        raise FlagError(f"--subnet-lease-renew-margin must be above 0 and below the lease "
                        f"TTL ({ns.subnet_lease_ttl / 60:g} min), got "
                        f"{ns.subnet_lease_renew_margin:g} min")
    # argparse checks choices on the command line only, not FLANNELD_* defaults.
    for flag, value, allowed in (("etcd-api", ns.etcd_api, ("auto", "v2", "v3")),
                                 ("log-level", ns.log_level,
                                  ("debug", "info", "warning", "error")),
                                 ("log-format", ns.log_format, ("text", "json")),
                                 ("engine-offload", ns.engine_offload, ("on", "off"))):
        if value not in allowed:
            raise FlagError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return AgentOptions(
        etcd=etcd, etcd_api=ns.etcd_api, iface=tuple(iface), public_ip=public_ip,
        subnet_file=ns.subnet_file, renew_margin=margin, lease_ttl=ns.subnet_lease_ttl,
        ip_masq=ns.ip_masq, healthz_ip=ns.healthz_ip, healthz_port=ns.healthz_port,
        log_level="debug" if ns.verbose else ns.log_level, log_format=ns.log_format,
        watch_timeout=ns.watch_timeout, engine_offload=ns.engine_offload == "on")


# ---- the agent --------------------------------------------------------------------------------
def peers_from_leases(peers: PeerMap, backend: str) -> tuple[Peer, ...]:
    """Lease table -> dataplane peers. Paths are a first guess; the route step decides."""
    path = Path.VXLAN if backend == "vxlan" else Path.DIRECT
    return tuple(Peer(le.subnet, le.attrs.public_ip,
                      le.attrs.vtep_mac if backend == "vxlan" else None, path,
                      partial_csum=backend == "vxlan" and le.attrs.csum_partial)
                 for le in sorted(peers.values(), key=lambda le: le.subnet))


class Agent:
    """One node. Built by :func:`main`; :meth:`run` returns the exit code."""

    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.started = time.time()
        self.iface: ExternalInterface | None = None
        self.public_ip: ipaddress.IPv4Address | None = None
        self.registry: Registry | None = None
        self.config: NetworkConfig | None = None
        self.mtu = 0
        self.vtep_mac: bytes | None = None
        self.keeper: LeaseKeeper | None = None
        self.watcher: PeerWatcher | None = None
        self.engine: Any = None  # dataplane.engine.Engine, imported lazily
        self.routes: Any = None  # control.routes.RouteProgrammer
        self.peers: tuple[Peer, ...] = ()  # what the dataplane has now, with paths
        self._lease_map: PeerMap = {}
        self._peers_changed = asyncio.Event()
        self._dataplane_up = False
        self._warnings: list[str] = []
        self._restart: asyncio.Future[None] | None = None
        self._switch_lock = asyncio.Lock()  # live reconfiguration, one change at a time
        self._routes_replaced = asyncio.Event()  # a new RouteProgrammer (new subnet)

    # ---- start-up steps ------------------------------------------------------------------
    async def _discover(self, stop: asyncio.Event) -> tuple[Registry, str] | None:
        """Find the config, retrying with backoff while etcd is away or the key is absent."""
        backoff = Backoff(base=0.5, cap=5.0)
        last_message = ""
        while not stop.is_set():
            try:
                return await discover(self.opts.etcd_api, self.opts.etcd)
            except RegistryUnavailable as exc:
                delay = backoff.failure(time.monotonic())
                message = (f"cannot reach etcd ({', '.join(self.opts.etcd.endpoints)}): {exc}; "
                           f"retrying (unreachable for {backoff.failing_for(time.monotonic()):.0f}"
                           " s)")
            except ConfigNotFound as exc:
                delay = backoff.failure(time.monotonic())
                message = f"{exc}\nwaiting for the config to appear"
            if message.split(";")[0] != last_message.split(";")[0] or backoff.attempts % 10 == 1:
                log.error("%s", message)
            last_message = message
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        return None

    async def _start_dataplane(self, lease: Lease) -> None:
        """The engine (vxlan) and the route programmer for our subnet."""
        assert self.config is not None and self.public_ip is not None
        from control.routes import RouteProgrammer
        backend = self.config.backend
        device = None
        if backend.type == "vxlan":
            self.engine = await self._make_engine(lease, self.config, self.mtu)
            device = self.engine.tun_name
        self._routes_replaced.set()
        self.routes = RouteProgrammer(device=device, network=self.config.network,
                                      own_subnet=lease.subnet)
        await self.routes.adopt()
        self._dataplane_up = True

    async def _stop_dataplane(self) -> None:
        self._dataplane_up = False
        if self.engine is not None:
            await self.engine.close()
            self.engine = None

    def _write_subnet_env(self, lease: Lease) -> None:
        assert self.config is not None
        subnetenv.write(self.opts.subnet_file, subnetenv.SubnetEnv(
            self.config.network, lease.subnet, self.mtu, self.opts.ip_masq))

    # ---- the route step --------------------------------------------------------------------
    async def program_routes(self, peers: tuple[Peer, ...]) -> tuple[Peer, ...]:
        """THE route step: make the kernel's routes match ``peers`` and return them with
        their paths (what the engine gets). Delegates to control.routes.RouteProgrammer:
        vxlan = one ``<Network> dev <tun>`` route (+ ``via PublicIP`` per DirectRouting
        peer on our segment), host-gw = ``<subnet> via <PublicIP>`` per reachable peer."""
        assert self.config is not None
        backend = self.config.backend
        result: tuple[Peer, ...] = await self.routes.sync(
            backend.type, backend.direct_routing, peers, handoff=self._handoff)
        self._warnings = list(self.routes.warnings)
        return result

    def _handoff(self, peers: tuple[Peer, ...]) -> None:
        """Give the engine a whole peer set (it tunnels only Path.VXLAN peers)."""
        self.peers = tuple(peers)
        if self.engine is not None:
            self.engine.set_peers(self.peers)

    def _on_peers(self, peers: PeerMap) -> None:
        self._lease_map = peers
        self._peers_changed.set()

    async def _apply_peers(self) -> None:
        """Forever: latest lease table -> routes -> engine. A failed round is retried."""
        assert self.config is not None
        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            await self._peers_changed.wait()
            await self._settle()
            peers = peers_from_leases(self._lease_map, self.config.backend.type)
            try:
                self._handoff(await self.program_routes(peers))
                backoff.success()
            except ControlError as exc:
                log.warning("programming routes failed (retrying): %s", exc)
                if self.config.backend.type == "vxlan":
                    self._handoff(peers)  # the tunnel works without per-peer routes
                await asyncio.sleep(backoff.failure(time.monotonic()))
                self._peers_changed.set()

    async def _settle(self, quiet: float = 0.1, longest: float = 1.0) -> None:
        """Coalesce a burst: wait until no change came for ``quiet`` s (at most
        ``longest`` s), so 100 changes cost one route sync, not 100."""
        deadline = time.monotonic() + longest
        while True:
            self._peers_changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._peers_changed.wait(), min(quiet, left))
            except TimeoutError:
                return

    async def _watch_routes(self) -> None:
        """Re-evaluate paths when links, addresses or routes change (DirectRouting).

        Follows ``self.routes``: after a dataplane restart (a new subnet) the old
        programmer's monitor is stopped, else its re-evaluations would hand its stale
        peer set to the engine and re-plan the kernel's routes for the old subnet."""
        while True:
            self._routes_replaced.clear()
            watch = asyncio.ensure_future(self.routes.watch(self._handoff))
            replaced = asyncio.ensure_future(self._routes_replaced.wait())
            try:
                await asyncio.wait({watch, replaced}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (watch, replaced):
                    t.cancel()
                await asyncio.gather(watch, replaced, return_exceptions=True)
            if not watch.cancelled():
                exc = watch.exception()
                if isinstance(exc, ControlError):
                    log.warning("route change monitor unavailable: %s", exc)
                    return
                if exc is not None:
                    raise exc

    def _lease_acquired(self, lease: Lease) -> None:
        """A (re-)acquired lease: refresh subnet.env; a new subnet means a new dataplane."""
        self._write_subnet_env(lease)
        if self.watcher is not None:
            self.watcher.own_subnet_changed()
        if self.routes is not None and lease.subnet != self.routes.own_subnet:
            log.warning("re-acquired a different subnet %s; restarting the dataplane",
                        lease.subnet)
            self._restart = asyncio.ensure_future(self._restart_dataplane(lease))

    async def _restart_dataplane(self, lease: Lease) -> None:
        await self._stop_dataplane()
        await self._start_dataplane(lease)
        self._peers_changed.set()

    # ---- live reconfiguration (control.reconfig) -------------------------------------------
    async def _follow_config(self, text: str) -> None:
        """Forever: watch ``<prefix>/config`` (``text`` is what we started with) and apply
        each change in place, without a restart. etcd trouble is the peer watch's to
        report; here it only means waiting and reading the key again."""
        from control.registry import ConfigWatch
        registry = self.registry
        if not isinstance(registry, ConfigWatch):
            return
        backoff = Backoff(base=0.5, cap=5.0)
        cursor: int | None = None
        current: str | None = text
        while True:
            try:
                if cursor is None:
                    value, cursor = await registry.get_config_rev()
                    changed = value != current
                else:
                    event = await registry.watch_config(cursor, self.opts.watch_timeout)
                    cursor, value, changed = event.cursor, event.value, event.changed
                backoff.success()
            except ResyncRequired:
                cursor = None
                continue
            except RegistryUnavailable:
                cursor = None
                await asyncio.sleep(backoff.failure(time.monotonic()))
                continue
            if changed:
                current = value
                try:
                    await self._reconfigure(value)
                except Exception as exc:  # a failed switch must not end the node
                    log.error("applying the new network config failed: %s: %s",
                              type(exc).__name__, exc)

    async def _reconfigure(self, text: str | None) -> None:
        """One new config value: switch in place, or keep the running config and say why."""
        from control import reconfig
        assert self.config is not None and self.iface is not None
        change = reconfig.plan_change(
            self.config, text, own_subnet=self.keeper.subnet if self.keeper else None,
            iface_mtu=self.iface.mtu, key=f"{self.opts.etcd.prefix.rstrip('/')}/config")
        if change.action is reconfig.Action.NONE:
            log.debug("%s", change.message)
        elif change.action is reconfig.Action.DELETED:
            log.warning("%s", change.message)
        elif change.action is reconfig.Action.REJECT:
            log.error("%s", change.message)
        else:
            log.info("%s", change.message)
            async with self._switch_lock:
                await self._switch_config(change)

    async def _switch_config(self, change: Any) -> None:
        """Apply a :class:`control.reconfig.ConfigChange`: engine first (a vxlan route
        needs its TUN), then config, subnet.env, peer filter, routes; the engine of a
        vxlan -> host-gw switch stops only once no route points into it; last, our
        lease is re-published with the new BackendType/VtepMAC."""
        from control.reconfig import EngineStep
        assert self.keeper is not None and self.watcher is not None
        assert self.keeper.lease is not None and self.public_ip is not None
        lease, new, step = self.keeper.lease, change.config, change.engine
        old_engine = self.engine
        if step in (EngineStep.START, EngineStep.RESTART):
            if old_engine is not None:  # RESTART: the new engine needs the UDP port
                self.engine = None
                await old_engine.close()
                old_engine = None
            if self.vtep_mac is None:
                from dataplane.wire import random_vtep_mac
                self.vtep_mac = random_vtep_mac()
            try:
                self.engine = await self._make_engine(lease, new, change.mtu)
            except (DataplaneError, OSError) as exc:
                log.error("cannot apply the new network config: the VXLAN engine did not "
                          "start: %s; keeping backend %s", exc, self.config.backend.type
                          if self.config else "?")
                return
            self.routes.device = self.engine.tun_name
        self.config = new
        self.mtu = change.mtu
        self._write_subnet_env(lease)
        self.watcher.set_backend_type(new.backend.type)  # hands out the new peer set
        peers = peers_from_leases(self._lease_map, new.backend.type)
        try:
            self._handoff(await self.program_routes(peers))
        except ControlError as exc:
            log.warning("programming routes after the switch failed (retrying): %s", exc)
        self._peers_changed.set()
        if step is EngineStep.STOP and old_engine is not None:
            self.engine = None
            self.routes.device = None
            await old_engine.close()
        b = new.backend
        vxlan = b.type == "vxlan"
        await self.keeper.republish(LeaseAttrs(self.public_ip, b.type, b.vni if vxlan else None,
                                               self.vtep_mac if vxlan else None,
                                               csum_partial=vxlan), new)

    async def _make_engine(self, lease: Lease, config: NetworkConfig, mtu: int) -> Any:
        """A started VXLAN engine for ``config`` (a live switch to vxlan, or new options)."""
        from dataplane.engine import Engine, EngineConfig
        assert self.public_ip is not None and self.vtep_mac is not None
        b = config.backend
        engine = Engine(EngineConfig(subnet=lease.subnet, public_ip=self.public_ip,
                                     vtep_mac=self.vtep_mac, vni=b.vni, mtu=mtu, port=b.port,
                                     offload=self.opts.engine_offload))
        await engine.start()
        log.info("VXLAN engine up: %s %s/32 mtu %d, UDP %s:%d, offload %s", engine.tun_name,
                 lease.subnet.network_address, mtu, self.public_ip, b.port,
                 "on" if self.opts.engine_offload else "off")
        return engine

    # ---- documents -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The /status document (also the source of /metrics)."""
        assert self.config is not None
        stats = self.engine.snapshot() if self.engine is not None else None
        counters = stats.peers if stats is not None else {}
        lease = self.keeper.lease if self.keeper is not None else None
        watcher = self.watcher
        paths = {row["subnet"]: row for row in self.routes.status()} if self.routes else {}
        peers = []
        for p in self.peers:
            key = str(p.subnet)
            c = counters.get(key)
            row = paths.get(key, {})
            peers.append({
                "subnet": key, "public_ip": str(p.public_ip),
                "vtep_mac": mac_to_text(p.vtep_mac) if p.vtep_mac else None,
                "path": p.path.value,
                "tx_packets": c.tx_packets if c else 0, "rx_packets": c.rx_packets if c else 0,
                "tx_bytes": c.tx_bytes if c else 0, "rx_bytes": c.rx_bytes if c else 0,
                "reason": row.get("reason"), "warning": row.get("warning"),
            })
        engine: dict[str, Any] = {}
        if stats is not None:
            engine = {k: v for k, v in stats.to_dict().items() if k not in ("peers", "drops")}
        now = time.monotonic()
        connected = watcher.connected if watcher is not None else False
        return {
            "node": {
                "subnet": str(lease.subnet) if lease else None,
                "public_ip": str(self.public_ip),
                "backend": self.config.backend.type,
                "direct_routing": self.config.backend.direct_routing,
                "vtep_mac": mac_to_text(self.vtep_mac) if self.vtep_mac else None,
                "mtu": self.mtu,
                "etcd_api": self.registry.api if self.registry else None,
                "iface": self.iface.name if self.iface else None,
                "network": str(self.config.network),
            },
            "peers": peers,
            "drops": dict(stats.drops) if stats is not None else {},
            "etcd": {
                "connected": connected,
                "lease_expires_at": self.keeper.expires_at if self.keeper else None,
                "disconnected_for": (None if connected or watcher is None
                                     else watcher.backoff.failing_for(now)),
                "reconnects": watcher.reconnects if watcher is not None else 0,
                "endpoints": list(self.opts.etcd.endpoints),
            },
            "engine": engine,
            "reconcile": {"operations": self.routes.operations if self.routes else {}},
            "warnings": list(self._warnings),
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        watcher = self.watcher
        connected = watcher.connected if watcher is not None else False
        doc = {
            "lease_held": self.keeper is not None and self.keeper.lease is not None,
            "peers_synced": watcher is not None and watcher.synced,
            "dataplane_up": self._dataplane_up,
            "etcd_connected": connected,
            "etcd_unreachable_for": (0.0 if connected or watcher is None
                                     else round(watcher.backoff.failing_for(time.monotonic()),
                                                1)),
        }
        ready = bool(doc["lease_held"] and doc["peers_synced"] and doc["dataplane_up"])
        return ready, doc

    def _routes_table(self) -> dict[str, Any]:
        def status() -> tuple[int, str, bytes]:
            return 200, "application/json", json.dumps(self.status(), indent=1).encode()

        def readyz() -> tuple[int, str, bytes]:
            ready, doc = self.readiness()
            return (200 if ready else 503), "application/json", json.dumps(doc).encode()

        def healthz() -> tuple[int, str, bytes]:
            return 200, "text/plain", b"ok\n"

        def metrics() -> tuple[int, str, bytes]:
            from control import metrics as m
            return 200, m.CONTENT_TYPE, m.render(self.status)
        return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/metrics": metrics}

    # ---- run -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        opts = self.opts
        self.iface = await asyncio.to_thread(find_interface, list(opts.iface))
        self.public_ip = opts.public_ip or self.iface.address
        log.info("external interface %s (%s, mtu %d), PublicIP %s", self.iface.name,
                 self.iface.address, self.iface.mtu, self.public_ip)

        found = await self._discover(stop)
        if found is None:
            return 0
        self.registry, text = found
        log.info("etcd API %s, network config %s", self.registry.api, text.strip())
        try:
            self.config = parse_config(text)
        except ConfigError as exc:
            raise ConfigError(f"bad network config at {opts.etcd.prefix.rstrip('/')}/config: "
                              f"{exc}") from None
        backend = self.config.backend
        self.mtu = self.config.mtu_for(self.iface.mtu)
        if backend.type == "vxlan":
            from dataplane.wire import random_vtep_mac
            self.vtep_mac = random_vtep_mac()
        attrs = LeaseAttrs(self.public_ip, backend.type,
                           backend.vni if backend.type == "vxlan" else None, self.vtep_mac,
                           csum_partial=backend.type == "vxlan")  # our engine completes them

        def preferred() -> list[ipaddress.IPv4Network]:
            old = subnetenv.read_subnet(opts.subnet_file)
            return [old] if old is not None else []
        self.keeper = LeaseKeeper(self.registry, self.config, attrs, preferred=preferred,
                                  ttl=opts.lease_ttl, margin=opts.renew_margin,
                                  clock=time.time, on_acquired=self._lease_acquired)
        acquire = asyncio.ensure_future(self.keeper.acquire())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({acquire, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(BaseException):
                await acquire
            return 0
        lease = acquire.result()
        log.info("subnet %s, network %s, backend %s%s, mtu %d; wrote %s", lease.subnet,
                 self.config.network, backend.type,
                 " + DirectRouting" if backend.direct_routing else "", self.mtu,
                 opts.subnet_file)

        await self._start_dataplane(lease)
        if opts.ip_masq:
            from control import masq
            tool = await masq.ainstall(self.config.network, lease.subnet)
            log.info("ip-masq rules installed with %s", tool)

        keeper = self.keeper
        self.watcher = PeerWatcher(
            self.registry, backend_type=backend.type, own_subnet=lambda: keeper.subnet,
            on_peers=self._on_peers, on_own_lease_lost=keeper.lost, clock=time.monotonic,
            own_public_ip=lambda: self.public_ip,
            watch_timeout=opts.watch_timeout)
        server = None
        if opts.healthz_port:
            from control.health import HealthServer
            server = HealthServer(opts.healthz_ip, opts.healthz_port, self._routes_table())
            await server.start()
            log.info("serving /healthz /readyz /status /metrics on %s:%d", opts.healthz_ip,
                     server.port)
        tasks = [asyncio.ensure_future(c) for c in (
            self.watcher.run(), keeper.run(), self._apply_peers(), self._watch_routes(),
            self._follow_config(text))]
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                failure = None if t is stopper or t.cancelled() else t.exception()
                if failure is not None:
                    raise failure
        finally:
            log.info("stopping; the lease on %s is kept for a restart",
                     keeper.subnet)
            for t in (*tasks, stopper):
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            if server is not None:
                await server.close()
            await self._stop_dataplane()
            await self.registry.close()
        return 0


# ---- entry point ------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Client libraries log every failed attempt; our own lines say what matters once.
    quiet = logging.DEBUG if level == "debug" else logging.CRITICAL
    for noisy in ("urllib3", "etcd", "aetcd", "grpc", "pyroute2"):
        logging.getLogger(noisy).setLevel(quiet)


async def _main(opts: AgentOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await Agent(opts).run(stop)


def main(argv: list[str]) -> int:
    """`flannelette run [flags]`: exit 0 on SIGTERM/SIGINT, 1 on a bad flag or config."""
    if any(a in ("-h", "--help") for a in argv):
        build_parser(os.environ).print_help()
        return 0
    try:
        opts = parse_args(argv, os.environ)
    except FlagError as exc:
        print(f"flannelette run: {exc}", file=sys.stderr)
        return 2
    from control import logs
    logs.setup(opts.log_level, opts.log_format)
    # gRPC (etcd v3) chatters about fork() when the dataplane runs `ip`; keep it quiet.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_main(opts))
    except KeyboardInterrupt:
        return 0
    except ControlError as exc:
        log.error("%s", exc)
        return 1
    except (DataplaneError, OSError) as exc:  # TUN/socket trouble: say what, no traceback
        log.error("cannot start the dataplane: %s", exc)
        return 1
