"""`flannelette run`: the node agent (flanneld's job), on uvloop. Wiring only.

Start-up, in order: pick the external interface; find the network config in
etcd (``control/follower.find_config``); hold a lease (``control/keeper``); start
the dataplane for it (``control/supervisor``: engine, routes, masquerade rules,
subnet.env); serve /healthz, /readyz, /status and /metrics (``control/health``,
documents from ``control/statusdoc``). Then four tasks run side by side: the
peer watch, the lease keeper, the supervisor (peers -> routes -> engine, route
re-evaluations, subnet moves) and the config follower (live switches).
SIGTERM/SIGINT stop it cleanly and keep the lease, so a restart keeps the
subnet. Bad flags and configs end it with one clear line; an unreachable etcd
is retried with backoff, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import uvloop

from control import debugapi, logs, subnetenv
from control.config import parse_config
from control.errors import ConfigError, ControlError, FlagError, RegistryUnavailable
from control.follower import ConfigFollower, find_config
from control.health import HealthServer, document_routes
from control.iface import find_interface
from control.keeper import LeaseKeeper
from control.lease import Lease, previous_vtep_mac
from control.options import AgentOptions, build_parser, parse_args
from control.statusdoc import Snapshot, WatchState
from control.supervisor import Supervisor, engine_starter
from control.tasks import run_together, until_stopped
from control.watch import PeerWatcher
from dataplane.errors import DataplaneError
from dataplane.wire import mac_to_str

log = logging.getLogger("flannelette.agent")


async def run(opts: AgentOptions, stop: asyncio.Event) -> int:
    """One node until ``stop`` is set; returns the exit code."""
    iface = await asyncio.to_thread(find_interface, list(opts.iface))
    public_ip = opts.public_ip or iface.address
    log.info("external interface %s (%s, mtu %d), PublicIP %s", iface.name, iface.address,
             iface.mtu, public_ip)
    found = await find_config(opts.etcd_api, opts.etcd, stop)
    if found is None:
        return 0
    registry, text = found
    key = f"{opts.etcd.prefix.rstrip('/')}/config"
    log.info("etcd API %s, network config %s", registry.api, text.strip())
    try:
        config = parse_config(text)
    except ConfigError as exc:
        raise ConfigError(f"bad network config at {key}: {exc}") from None
    dp = Supervisor(config, config.mtu_for(iface.mtu), public_ip, subnet_file=opts.subnet_file,
                    ip_masq=opts.ip_masq, offload=opts.engine_offload,
                    tunnel_gso=opts.tunnel_gso, inner_source_check=opts.inner_source_check,
                    source_ports=opts.source_ports,
                    engine_starter=engine_starter(opts.workers))
    if dp.vtep_mac is not None:  # vxlan: keep the VtepMAC our lease has (a restart)
        try:
            held = await registry.list_leases()
        except RegistryUnavailable:
            held = None
        mac = previous_vtep_mac(held.leases if held else (), public_ip,
                                subnetenv.previous(opts.subnet_file))
        if mac is not None:
            dp.vtep_mac = mac
            log.info("reusing VtepMAC %s from our lease", mac_to_str(mac))
    watcher: PeerWatcher | None = None

    def acquired(lease: Lease) -> None:
        dp.lease_acquired(lease)
        if watcher is not None:
            watcher.own_subnet_changed()

    keeper = LeaseKeeper(registry, config, dp.lease_attrs(),
                         preferred=lambda: subnetenv.previous(opts.subnet_file),
                         ttl=opts.lease_ttl, margin=opts.renew_margin, clock=time.time,
                         on_acquired=acquired)
    try:
        lease = await until_stopped(keeper.acquire(), stop)
        if lease is None:
            return 0
        b = config.backend
        log.info("subnet %s, network %s, backend %s%s, mtu %d; wrote %s", lease.subnet,
                 config.network, b.type, " + DirectRouting" if b.direct_routing else "",
                 dp.mtu, opts.subnet_file)
        await dp.start(lease)
        watcher = PeerWatcher(registry, backend_type=b.type, own_subnet=lambda: keeper.subnet,
                              on_peers=dp.offer_peers, on_own_lease_lost=keeper.lost,
                              clock=time.monotonic, own_public_ip=lambda: public_ip,
                              watch_timeout=opts.watch_timeout)
        follower = ConfigFollower(registry, dp, keeper, watcher, key=key, iface_mtu=iface.mtu,
                                  watch_timeout=opts.watch_timeout)

        def snapshot(w: PeerWatcher = watcher) -> Snapshot:
            return Snapshot(
                config=dp.config, mtu=dp.mtu, public_ip=public_ip, iface=iface.name,
                vtep_mac=dp.vtep_mac, etcd_api=registry.api, endpoints=opts.etcd.endpoints,
                lease=keeper.lease, lease_expires_at=keeper.expires_at,
                watch=WatchState(w.connected, w.synced, w.reconnects, w.backoff.failing_since),
                dataplane=dp.state(), config_generation=follower.generation)
        server = None
        if opts.healthz_port:
            server = HealthServer(opts.healthz_ip, opts.healthz_port, document_routes(snapshot),
                                  debugapi.agent_streams(dp, lambda: watcher,
                                                         lambda: follower.generation))
            await server.start()
            log.info("serving /healthz /readyz /status /metrics on %s:%d", opts.healthz_ip,
                     server.port)
        try:
            await run_together(watcher.run(), keeper.run(), dp.run(), follower.run(text),
                               stop=stop)
        finally:
            log.info("stopping; the lease on %s is kept for a restart", keeper.subnet)
            if server is not None:
                await server.close()
        return 0
    finally:
        await dp.close()
        await registry.close()


def main(argv: list[str]) -> int:
    """`flannelette run [flags]`: exit 0 on SIGTERM/SIGINT, 1 on a bad config, 2 on a flag."""
    if any(a in ("-h", "--help") for a in argv):
        build_parser(os.environ).print_help()
        return 0
    try:
        opts = parse_args(argv, os.environ)
    except FlagError as exc:
        print(f"flannelette run: {exc}", file=sys.stderr)
        return 2
    logs.setup(opts.log_level, opts.log_format)
    # gRPC (etcd v3) chatters about fork() when the dataplane runs `ip`; keep it quiet.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

    async def node() -> int:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        return await run(opts, stop)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(node())
    except KeyboardInterrupt:
        return 0
    except ControlError as exc:
        log.error("%s", exc)
        return 1
    except (DataplaneError, OSError) as exc:  # TUN/socket trouble: say what, no traceback
        log.error("cannot start the dataplane: %s", exc)
        return 1
