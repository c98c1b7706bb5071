"""`flannelette engine`: run the VXLAN engine with a static peer set (no etcd).

Used by the namespace tests, the benchmarks and for debugging. Unlike the
agent, it installs the routes itself: one route per peer subnet into the TUN,
through the same netlink applier as the agent (tagged with flannelette's
protocol number, so `flannelette cleanup` finds them; they vanish with the TUN
when the process exits). Runs until SIGTERM/SIGINT, then writes a last stats
snapshot and exits 0.

Like the agent it serves ``/healthz``, ``/status`` (node, peers, drops and the
engine's counters, the shape `flannelette status` reads), ``/metrics`` and the
debug routes (``/debug/*``: capture, trace, drops, explain, node) on
``--healthz-ip:--healthz-port`` (default 127.0.0.1:9480, the agent's; 0 turns the
server off). An address already in use is a warning, not an error: the engine runs
without the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from control import metrics, netlink
from control.debugapi import DebugApi, engine_node
from control.health import Handler, HealthServer
from control.reconcile import OpKind, Route, RouteOp
from dataplane import wire
from dataplane.engine import Engine, EngineConfig
from dataplane.errors import DataplaneError
from dataplane.fib import Peer
from dataplane.stats import EngineStats
from dataplane.workers import AnyEngine, EnginePool

# A 4th --peer field: the peer is a flannelette engine (accepts partial TCP checksums).
FLANNELETTE = "flannelette"


class _UsageError(DataplaneError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _peer(text: str) -> Peer:
    parts = text.split(",")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3].strip() != FLANNELETTE):
        raise argparse.ArgumentTypeError(
            f"--peer wants SUBNET,PUBLICIP,VTEPMAC[,{FLANNELETTE}], got {text!r}")
    try:
        subnet = ipaddress.IPv4Network(parts[0].strip())
        public_ip = ipaddress.IPv4Address(parts[1].strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--peer {text!r}: {e}") from None
    try:
        mac = wire.mac_from_str(parts[2])
    except DataplaneError as e:
        raise argparse.ArgumentTypeError(f"--peer {text!r}: {e}") from None
    return Peer(subnet, public_ip, mac, partial_csum=len(parts) == 4)


def _mac(text: str) -> bytes:
    try:
        return wire.mac_from_str(text)
    except DataplaneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _address(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _parser() -> _Parser:
    p = _Parser(prog="flannelette engine",
                description="Run the userspace VXLAN engine with a static peer set.")
    p.add_argument("--subnet", type=_subnet, required=True, help="own subnet, e.g. 10.244.1.0/24")
    p.add_argument("--public-ip", type=_address, required=True, help="address to bind UDP on")
    p.add_argument("--vtep-mac", type=_mac, default=None, help="own VtepMAC (default: random)")
    p.add_argument("--vni", type=int, default=1)
    p.add_argument("--mtu", type=int, default=1450, help="TUN MTU (external MTU - 50)")
    p.add_argument("--tun-name", default=None, help="default flannel.<vni>")
    p.add_argument("--port", type=int, default=wire.VXLAN_PORT)
    p.add_argument("--peer", type=_peer, action="append", default=[],
                   metavar="SUBNET,PUBLICIP,VTEPMAC[,flannelette]",
                   help="a peer (repeatable); ',flannelette' marks a flannelette engine, "
                        "whose TCP segments may carry partial checksums (offload on)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--batch", type=int, default=256, help="packets drained per wake-up")
    p.add_argument("--busy-poll-us", type=int, default=0, metavar="US",
                   help="after a wake-up that moved packets, poll this long before sleeping "
                        "(CPU for latency; 0 = off)")
    p.add_argument("--offload", choices=("on", "off"), default="off",
                   help="TUN TSO + UDP GSO/GRO + userspace GRO (default off)")
    p.add_argument("--rx-gro", choices=("on", "off"), default="on",
                   help="UDP GRO + userspace GRO on receive, also with --offload off "
                        "(default on; off: one datagram per receive)")
    p.add_argument("--tx-gso", choices=("on", "off"), default="on",
                   help="with --offload off: full-size packets to one peer drained in one "
                        "wake-up go out in one UDP GSO send (default on)")
    p.add_argument("--tunnel-gso", choices=("auto", "on", "off"), default="auto",
                   help="with --offload on: TCP super-packets wrapped once and segmented by the "
                        "kernel through a TAP (Linux >= 6.17); auto = when available")
    p.add_argument("--source-ports", type=int, default=8, metavar="N",
                   help="send each inner flow from one of N ephemeral outer source ports (by "
                        "flow hash), so receivers spread flows as with the kernel's VXLAN "
                        "(default 8; 0: all from --port)")
    p.add_argument("--inner-source-check", choices=("on", "off"), default="on",
                   help="drop a peer's datagrams whose inner IPv4 source is outside that "
                        "peer's subnet (default on; off only for debugging)")
    p.add_argument("--workers", type=int, default=1,
                   help="engine processes sharing a multi-queue TUN and SO_REUSEPORT sockets "
                        "(default 1: in-process; see docs/operations.md)")
    p.add_argument("--stats-file", default=None, help="JSON stats, rewritten periodically")
    p.add_argument("--stats-interval", type=float, default=0.5, help="seconds between writes")
    p.add_argument("--healthz-ip", default="127.0.0.1",
                   help="address of /healthz, /status, /metrics and /debug/* (default 127.0.0.1)")
    p.add_argument("--healthz-port", type=int, default=9480,
                   help="their port (default 9480, as the agent; 0: no server)")
    return p


def status_doc(engine: AnyEngine) -> dict[str, Any]:
    """The /status document of a standalone engine (the agent's shape, no etcd parts)."""
    c = engine.config
    st = engine.snapshot()
    peers = []
    for p in engine.fib.peers:
        pc = st.peers.get(str(p.subnet))
        peers.append({"subnet": str(p.subnet), "public_ip": str(p.public_ip),
                      "vtep_mac": wire.mac_to_str(p.vtep_mac) if p.vtep_mac else None,
                      "path": p.path.value,
                      "tx_packets": pc.tx_packets if pc else 0,
                      "rx_packets": pc.rx_packets if pc else 0,
                      "tx_bytes": pc.tx_bytes if pc else 0, "rx_bytes": pc.rx_bytes if pc else 0})
    figures = {k: v for k, v in st.to_dict().items() if k not in ("peers", "drops")}
    figures["taps_active"] = engine.taps_active
    return {"node": {"subnet": str(c.subnet), "public_ip": str(c.public_ip),
                     "backend": "vxlan (standalone engine)", "direct_routing": False,
                     "vtep_mac": wire.mac_to_str(c.vtep_mac), "mtu": c.mtu, "vni": c.vni,
                     "port": c.port, "tun": engine.tun_name},
            "peers": peers, "drops": dict(st.drops), "engine": figures}


def _routes(engine: AnyEngine) -> dict[str, Handler]:
    def status() -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(status_doc(engine), indent=1).encode()

    def metrics_text() -> tuple[int, str, bytes]:
        return 200, metrics.CONTENT_TYPE, metrics.render(lambda: status_doc(engine))
    return {"/healthz": lambda: (200, "text/plain", b"ok\n"), "/readyz": status,
            "/status": status, "/metrics": metrics_text}


async def _serve(engine: AnyEngine, host: str, port: int) -> HealthServer | None:
    """The engine's HTTP server, or None (port 0, or the address is taken: a warning)."""
    if not port:
        return None
    api = DebugApi(lambda: [engine], lambda: engine_node(engine))
    server = HealthServer(host, port, _routes(engine), api.streams())
    try:
        await server.start()
    except OSError as e:
        print(f"flannelette engine: warning: no /status or /debug server on {host}:{port} "
              f"({e.strerror or e}); pass another --healthz-port, or 0 for none",
              file=sys.stderr, flush=True)
        return None
    return server


def _write_stats(engine: AnyEngine, path: str) -> None:
    """Atomically replace ``path`` with the engine's counters as JSON."""
    data = engine.snapshot().to_dict()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


async def _run(config: EngineConfig, peers: Sequence[Peer], stats_file: str | None,
               interval: float, healthz: tuple[str, int] = ("127.0.0.1", 0),
               workers: int = 1) -> None:
    engine: AnyEngine = Engine(config) if workers == 1 else EnginePool(config, workers)
    engine.set_peers(peers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    server: HealthServer | None = None
    try:
        server = await _serve(engine, *healthz)
        errors = await netlink.aapply_ops([RouteOp(OpKind.REPLACE, Route(p.subnet, None,
                                                                         engine.tun_name))
                                           for p in peers])
        if errors:
            raise DataplaneError("; ".join(errors))
        print(f"engine up: {engine.tun_name} {config.subnet} "
              f"mac {wire.mac_to_str(config.vtep_mac)} on {config.public_ip}:{config.port}, "
              f"{len(peers)} peer(s)" + (f", {workers} workers" if workers > 1 else "")
              + (f", /status and /debug on {server.host}:{server.port}" if server else ""),
              flush=True)
        while not stop.is_set():
            if stats_file:
                _write_stats(engine, stats_file)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        if server is not None:
            await server.close()
        if stats_file:
            _write_stats(engine, stats_file)
        await engine.close()


def command(subnet: str, public_ip: str, vtep_mac: str, peers: Sequence[Sequence[str]],
            *extra: str, python: str | None = None) -> list[str]:
    """The argv that runs this engine as a process (for tests and benchmarks).

    A peer is (subnet, public_ip, vtep_mac[, "flannelette"]).
    """
    argv = [python or sys.executable, "-m", "dataplane.standalone", "--subnet", subnet,
            "--public-ip", public_ip, "--vtep-mac", vtep_mac]
    for p in peers:
        argv += ["--peer", ",".join(p)]
    return argv + list(extra)


def read_stats(path: str) -> EngineStats | None:
    """The last snapshot a running engine wrote to ``--stats-file`` (None before the first)."""
    try:
        with open(path) as f:
            return EngineStats.from_dict(json.load(f))
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    """Entry point of `flannelette engine`."""
    try:
        args = _parser().parse_args(argv)
        config = EngineConfig(
            subnet=args.subnet, public_ip=args.public_ip,
            vtep_mac=args.vtep_mac or wire.random_vtep_mac(), vni=args.vni, mtu=args.mtu,
            tun_name=args.tun_name, port=args.port, batch=args.batch,
            offload=args.offload == "on", rx_gro=args.rx_gro == "on",
            tx_gso=args.tx_gso == "on", check_inner_source=args.inner_source_check == "on",
            tunnel_gso=args.tunnel_gso, busy_poll_us=args.busy_poll_us,
            source_ports=args.source_ports)
        if not 1 <= args.workers <= 64:
            raise _UsageError(f"--workers must be in 1..64, got {args.workers}")
        if args.stats_interval <= 0:
            raise _UsageError(f"--stats-interval must be > 0, got {args.stats_interval}")
        if not 0 <= args.healthz_port <= 65535:
            raise _UsageError(f"--healthz-port must be in 0..65535, got {args.healthz_port}")
        coro = _run(config, args.peer, args.stats_file, args.stats_interval,
                    (args.healthz_ip, args.healthz_port), args.workers)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    except DataplaneError as e:  # bad flags, bad config, device errors: one line
        print(f"flannelette engine: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. FibError from a bad peer set
        print(f"flannelette engine: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
