"""The dataplane of one lease: VXLAN engine, kernel routes, masquerade rules, subnet.env.

:class:`Supervisor` is the one owner of each of them. It builds the engine (in
:func:`start_engine`, the only place one is made), keeps one
:class:`~control.routes.RouteProgrammer` per subnet, and is the only writer of the
engine's peer set: every peer set, from a lease change, a route re-evaluation or
a live switch, goes through :meth:`Supervisor._handoff`. A re-acquired lease for a
*different* subnet gives a new dataplane: engine, routes and masquerade rules for
the new subnet (the rules name it). Other parts change it only through its
methods: the agent (start, peers, leases), the config follower (the steps of a
live switch, inside :meth:`Supervisor.exclusive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol

from control import masq, subnetenv
from control.backoff import Backoff
from control.config import BackendType, NetworkConfig
from control.errors import ControlError
from control.lease import Lease, LeaseAttrs
from control.reconcile import Decision
from control.routes import Handoff, RouteProgrammer
from control.statusdoc import DataplaneState
from control.tasks import run_together
from control.watch import PeerMap
from dataplane.engine import Engine, EngineConfig
from dataplane.errors import DataplaneError
from dataplane.fib import Path, Peer
from dataplane.stats import EngineStats
from dataplane.wire import random_vtep_mac
from dataplane.workers import EnginePool

log = logging.getLogger("flannelette.agent")

Subnet = ipaddress.IPv4Network


class RunningEngine(Protocol):
    """What the supervisor uses of a started engine (the fakes in tests provide it too)."""

    @property
    def tun_name(self) -> str: ...

    def set_peers(self, peers: Iterable[Peer]) -> None: ...

    def snapshot(self) -> EngineStats: ...

    async def close(self) -> None: ...


class RouteOwner(Protocol):
    """What the supervisor uses of a route programmer."""

    device: str | None
    own_subnet: Subnet

    @property
    def warnings(self) -> tuple[str, ...]: ...

    @property
    def decisions(self) -> tuple[Decision, ...]: ...

    @property
    def operations(self) -> dict[str, int]: ...

    async def adopt(self) -> object: ...

    async def sync(self, backend: str, direct_routing: bool, peers: tuple[Peer, ...], *,
                   handoff: Handoff | None = None) -> tuple[Peer, ...]: ...

    async def watch(self, on_peers: Handoff) -> None: ...


EngineStarter = Callable[[EngineConfig], Awaitable[RunningEngine]]
RoutesFactory = Callable[[str | None, Subnet, Subnet], RouteOwner]
MasqInstaller = Callable[[Subnet, Subnet], Awaitable[str]]


async def start_engine(config: EngineConfig, workers: int = 1) -> Engine | EnginePool:
    """The one place a VXLAN engine is built and started (for start-up and live switches);
    ``workers`` > 1: that many engine processes as one (dataplane/workers.py)."""
    engine: Engine | EnginePool = Engine(config) if workers == 1 else EnginePool(config, workers)
    await engine.start()
    return engine


def engine_starter(workers: int) -> EngineStarter:
    """:func:`start_engine` with ``workers`` (the agent's --workers)."""
    async def start(config: EngineConfig) -> RunningEngine:
        return await start_engine(config, workers)
    return start


def route_programmer(device: str | None, network: Subnet, own_subnet: Subnet) -> RouteOwner:
    """The real route programmer (tests pass a fake factory instead)."""
    return RouteProgrammer(device=device, network=network, own_subnet=own_subnet)


def peers_from_leases(peers: PeerMap, backend: BackendType) -> tuple[Peer, ...]:
    """Lease table -> dataplane peers. Paths are a first guess; the route step decides."""
    vxlan = backend is BackendType.VXLAN
    path = Path.VXLAN if vxlan else Path.DIRECT
    return tuple(Peer(le.subnet, le.attrs.public_ip, le.attrs.vtep_mac if vxlan else None, path,
                      partial_csum=vxlan and le.attrs.csum_partial)
                 for le in sorted(peers.values(), key=lambda le: le.subnet))


class Supervisor:
    """Owns engine + routes + masquerade rules + subnet.env for our lease."""

    def __init__(self, config: NetworkConfig, mtu: int, public_ip: ipaddress.IPv4Address, *,
                 subnet_file: str, ip_masq: bool = False, offload: bool = False,
                 tunnel_gso: str = "auto", inner_source_check: bool = True,
                 source_ports: int = 8,
                 engine_starter: EngineStarter = start_engine,
                 routes_factory: RoutesFactory = route_programmer,
                 masq_installer: MasqInstaller = masq.ainstall) -> None:
        self.config = config
        self.mtu = mtu
        self.public_ip = public_ip
        self.vtep_mac: bytes | None = (random_vtep_mac()
                                       if config.backend.type is BackendType.VXLAN else None)
        self.lease: Lease | None = None  # the lease the dataplane runs for
        self.engine: RunningEngine | None = None
        self.routes: RouteOwner | None = None
        self.peers: tuple[Peer, ...] = ()  # what the engine has now, with paths
        self._subnet_file = subnet_file
        self._ip_masq = ip_masq
        self._offload = offload
        self._tunnel_gso = tunnel_gso if offload else "off"
        self._inner_source_check = inner_source_check
        self._source_ports = source_ports
        self._start_engine = engine_starter
        self._new_routes = routes_factory
        self._install_masq = masq_installer
        self._acquired: Lease | None = None  # the latest lease the keeper holds
        self._masq_subnet: Subnet | None = None  # the subnet the installed rules name
        self._leases: PeerMap = {}
        self._warnings: tuple[str, ...] = ()
        self._up = False
        self._lock = asyncio.Lock()  # one change of the dataplane at a time
        self._changed = asyncio.Event()  # peers or lease changed: run a round
        self._routes_replaced = asyncio.Event()  # a new RouteProgrammer (new subnet)
        self._engine_lost: str | None = None  # why the running engine stopped (TUN deleted)
        self.engine_restarts = 0

    # ---- what others read ------------------------------------------------------------------
    def lease_attrs(self) -> LeaseAttrs:
        """Our lease value for the running config (our engine completes partial checksums)."""
        b = self.config.backend
        vxlan = b.type is BackendType.VXLAN
        return LeaseAttrs(self.public_ip, b.type, b.vni if vxlan else None,
                          self.vtep_mac if vxlan else None, csum_partial=vxlan)

    def state(self) -> DataplaneState:
        routes, engine = self.routes, self.engine
        moving = (self._acquired is not None and self.lease is not None
                  and self._acquired.subnet != self.lease.subnet)
        return DataplaneState(
            up=self._up and not moving, peers=self.peers,
            decisions=routes.decisions if routes is not None else (),
            engine=engine.snapshot() if engine is not None else None,
            route_operations=routes.operations if routes is not None else {},
            warnings=self._warnings, taps_active=int(getattr(engine, "taps_active", 0)))

    # ---- lease -----------------------------------------------------------------------------
    def lease_acquired(self, lease: Lease) -> None:
        """The keeper holds ``lease`` (at start or again): subnet.env at once; a different
        subnet than the dataplane's means a new dataplane (done by :meth:`run`)."""
        self._acquired = lease
        self.write_subnet_env()
        if self.lease is not None and lease.subnet != self.lease.subnet:
            log.warning("re-acquired a different subnet %s; restarting the dataplane",
                        lease.subnet)
            self._changed.set()

    def write_subnet_env(self) -> None:
        if self._acquired is not None:
            subnetenv.write(self._subnet_file, subnetenv.SubnetEnv(
                self.config.network, self._acquired.subnet, self.mtu, self._ip_masq))

    async def start(self, lease: Lease) -> None:
        """The dataplane for ``lease``: engine (vxlan), routes adopted, masquerade rules."""
        async with self._lock:
            await self._start(lease)

    async def _start(self, lease: Lease) -> None:
        self.lease = lease
        device = None
        if self.config.backend.type is BackendType.VXLAN:
            await self.start_engine(self.config, self.mtu)
            assert self.engine is not None
            device = self.engine.tun_name
        self.routes = self._new_routes(device, self.config.network, lease.subnet)
        self._routes_replaced.set()
        await self.routes.adopt()
        if self._ip_masq and self._masq_subnet != lease.subnet:
            tool = await self._install_masq(self.config.network, lease.subnet)
            self._masq_subnet = lease.subnet
            log.info("ip-masq rules installed with %s (Network %s, subnet %s)", tool,
                     self.config.network, lease.subnet)
        self._up = True

    async def close(self) -> None:
        """Stop the engine; routes and rules stay, so a restart does not cut traffic."""
        self._up = False
        await self.stop_engine()

    # ---- the steps of a live switch (call inside exclusive()) -----------------------------
    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold off peer rounds and subnet moves while a sequence of steps runs."""
        async with self._lock:
            yield

    async def start_engine(self, config: NetworkConfig, mtu: int) -> None:
        """A started engine for ``config``; our routes then point into its TUN."""
        assert self.lease is not None
        if self.vtep_mac is None:
            self.vtep_mac = random_vtep_mac()
        b = config.backend
        self.engine = await self._start_engine(EngineConfig(
            subnet=self.lease.subnet, public_ip=self.public_ip, vtep_mac=self.vtep_mac,
            vni=b.vni, mtu=mtu, port=b.port, offload=self._offload,
            tunnel_gso=self._tunnel_gso, check_inner_source=self._inner_source_check,
            source_ports=self._source_ports))
        if self.routes is not None:
            self.routes.device = self.engine.tun_name
        if isinstance(self.engine, Engine):
            self.engine.on_failure = self._engine_failed
        stats = self.engine.snapshot()
        log.info("VXLAN engine up: %s %s/32 mtu %d, UDP %s:%d, offload %s, tx path %s "
                 "(tunnel GSO %s)", self.engine.tun_name, self.lease.subnet.network_address,
                 mtu, self.public_ip, b.port, "on" if self._offload else "off", stats.tx_path,
                 stats.tunnel_gso)

    def _engine_failed(self, reason: str) -> None:
        """The engine lost its TUN (someone deleted it): :meth:`run` builds a new one."""
        log.warning("VXLAN engine stopped: %s; starting a new one", reason)
        self._engine_lost = reason
        self._changed.set()

    async def _recover_engine(self) -> None:
        """A new engine (and TUN) for the one that failed; the round then routes into it."""
        if self._engine_lost is None or self.lease is None:
            return
        if self.engine is not None:
            await self.stop_engine()
        await self.start_engine(self.config, self.mtu)
        self._engine_lost = None
        self.engine_restarts += 1
        log.info("VXLAN engine replaced (%d so far)", self.engine_restarts)

    async def stop_engine(self) -> None:
        engine, self.engine = self.engine, None
        if self.routes is not None:
            self.routes.device = None
        if engine is not None:
            await engine.close()

    def take_config(self, config: NetworkConfig, mtu: int) -> None:
        self.config = config
        self.mtu = mtu

    async def program_routes(self) -> None:
        """One round for the current lease table now, another soon (the watch's new set)."""
        try:
            await self._round(peers_from_leases(self._leases, self.config.backend.type))
        except ControlError as exc:
            log.warning("programming routes after the switch failed (retrying): %s", exc)
        self._changed.set()

    # ---- peers -------------------------------------------------------------------------------
    def offer_peers(self, leases: PeerMap) -> None:
        """The peer watch's latest lease table; :meth:`run` applies it."""
        self._leases = leases
        self._changed.set()

    def _handoff(self, peers: tuple[Peer, ...]) -> None:
        """THE writer of the engine's peer set (it tunnels only Path.VXLAN peers)."""
        self.peers = tuple(peers)
        if self.engine is not None:
            self.engine.set_peers(self.peers)

    async def _round(self, peers: tuple[Peer, ...]) -> None:
        """The route step: kernel routes for ``peers``, then the engine gets them with paths."""
        if self.routes is None:
            return
        b = self.config.backend
        self._handoff(await self.routes.sync(b.type, b.direct_routing, peers,
                                             handoff=self._handoff))
        self._warnings = self.routes.warnings

    async def _follow_lease(self) -> None:
        """A re-acquired lease for another subnet (or a failed try at that): a new
        dataplane for it."""
        lease = self._acquired
        if lease is None or self.lease is None or (self._up
                                                   and lease.subnet == self.lease.subnet):
            return
        self._up = False
        await self.stop_engine()
        await self._start(lease)

    async def _attempt(self) -> str | None:
        """One round: follow the lease, then the routes; what failed, or None."""
        try:
            await self._follow_lease()
        except (ControlError, DataplaneError, OSError) as exc:
            return f"starting the dataplane for the new subnet failed (retrying): {exc}"
        try:
            await self._recover_engine()
        except (DataplaneError, OSError) as exc:
            return f"starting a new VXLAN engine failed (retrying): {exc}"
        peers = peers_from_leases(self._leases, self.config.backend.type)
        try:
            await self._round(peers)
        except ControlError as exc:
            if self.config.backend.type is BackendType.VXLAN:
                self._handoff(peers)  # the tunnel works without per-peer routes
            return f"programming routes failed (retrying): {exc}"
        return None

    async def run(self) -> None:
        """Forever: latest leases -> routes -> engine, and route re-evaluations."""
        await run_together(self._apply_loop(), self._watch_routes())

    async def _apply_loop(self) -> None:
        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            await self._changed.wait()
            await self._settle()
            async with self._lock:
                failure = await self._attempt()
            if failure is None:
                backoff.success()
                continue
            log.warning("%s", failure)
            await asyncio.sleep(backoff.failure(time.monotonic()))
            self._changed.set()

    async def _settle(self, quiet: float = 0.1, longest: float = 1.0) -> None:
        """Coalesce a burst: wait until no change came for ``quiet`` s (at most
        ``longest`` s), so 100 changes cost one route sync, not 100."""
        deadline = time.monotonic() + longest
        while True:
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), min(quiet, left))
            except TimeoutError:
                return

    async def _watch_routes(self) -> None:
        """Re-evaluate paths when links, addresses or routes change (DirectRouting).

        Follows ``self.routes``: after a new subnet the old programmer's monitor is
        stopped, and its late re-evaluations are ignored, else its stale peer set would
        reach the engine and re-plan the kernel's routes for the old subnet."""
        while True:
            self._routes_replaced.clear()
            routes = self.routes
            assert routes is not None

            def handoff(peers: tuple[Peer, ...], routes: RouteOwner = routes) -> None:
                if self.routes is routes:
                    self._handoff(peers)
            watch = asyncio.ensure_future(routes.watch(handoff))
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

