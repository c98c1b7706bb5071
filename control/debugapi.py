"""The debug endpoints of the agent and of `flannelette engine` (served by HealthServer).

- ``/debug/node``: the node as explain and inject see it (lease, peers with paths,
  VtepMAC, VNI, port, MTU, TUN; on an agent the config generation), JSON.
- ``/debug/drops[?reason=R]``: the flight recorder's records (bytes as hex), JSON.
- ``/debug/capture?side=&count=&duration=&filter=&peer=&verdict=&reason=&direction=``:
  a live pcapng stream (outer frames on interface "outer", inner packets on
  "inner", the verdict as each packet's comment, one ``epb_packetid`` per packet).
- ``/debug/trace?...`` (same parameters): one JSON object per record and line; the
  last line is ``{"end": ..., "records": N, "lost": M}``.
- ``/debug/explain?src=&dst=&proto=&dport=&sport=&size=&outer_src=&vni=&inner_dst_mac=``:
  :func:`control.explain.explain` with the kernel's route lookups, JSON.

A capture or trace attaches one :class:`TapSubscriber` to every live engine (and
to a new one that replaces it, e.g. after a backend switch) and ends when the
subscriber is done (count or bytes) or expired (duration), when no engine is
left, or when the client goes away; its taps are removed on every one of
those paths. Nothing here runs per packet: the engine queues records, this
module drains them every ``poll`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from control import netlink
from control.debugpcap import CaptureFile, drop_json, tap_json
from control.explain import NodeView, Probe, explain, lookups_needed
from control.health import StreamHandler, response_head
from control.reconcile import RouteLookup
from control.statusdoc import ConfigGeneration
from dataplane.bpf import FilterError, compile_filter
from dataplane.engine import Engine
from dataplane.errors import DataplaneError
from dataplane.tap import SIDES, VERDICTS, TapFilter, TapRecord, TapSubscriber
from dataplane.wire import VXLAN_PORT, DropReason, mac_from_str
from dataplane.workers import AnyEngine, EnginePool

if TYPE_CHECKING:
    from control.supervisor import Supervisor
    from control.watch import PeerWatcher

EngineSource = Callable[[], Sequence[AnyEngine]]
NodeSource = Callable[[], NodeView]
GenerationSource = Callable[[], ConfigGeneration | None]
RouteGet = Callable[[Sequence[ipaddress.IPv4Address]],
                    Mapping[ipaddress.IPv4Address, Sequence[RouteLookup] | None]]
PCAPNG = "application/x-pcapng"
JSONL = "application/x-ndjson"
REASONS = tuple(r.value for r in DropReason)
MAX_COUNT = 10_000_000


class QueryError(ValueError):
    """A bad query parameter; the message is the 400 body."""


def _int(q: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    text = q.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise QueryError(f"{name} must be an integer, got {text!r}") from None
    if not lo <= value <= hi:
        raise QueryError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _addr(q: Mapping[str, str], name: str, required: bool = False) -> ipaddress.IPv4Address | None:
    text = q.get(name, "").strip()
    if not text:
        if required:
            raise QueryError(f"{name} is required (an IPv4 address)")
        return None
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise QueryError(f"{name} must be an IPv4 address, got {text!r}") from None


def subscriber(q: Mapping[str, str], now: float) -> TapSubscriber:
    """The tap subscriber a capture/trace query asks for (QueryError if it is wrong)."""
    side = q.get("side") or "both"
    if side not in SIDES:
        raise QueryError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    verdict = q.get("verdict") or None
    if verdict is not None and verdict not in VERDICTS:
        raise QueryError(f"verdict must be forwarded or dropped, got {verdict!r}")
    direction = q.get("direction") or None
    if direction is not None and direction not in ("tx", "rx"):
        raise QueryError(f"direction must be tx or rx, got {direction!r}")
    reason = q.get("reason") or None
    if reason is not None and reason not in REASONS:
        raise QueryError(f"unknown drop reason {reason!r}; known: {', '.join(REASONS)}")
    peer = q.get("peer") or None
    if peer is not None:
        try:
            peer = str(ipaddress.IPv4Network(peer, strict=False))
        except ValueError:
            raise QueryError(f"peer must be a subnet like 10.244.2.0/24, got {peer!r}") from None
    expr = q.get("filter", "")
    try:
        program = compile_filter(expr) if expr.strip() else None
    except FilterError as e:
        raise QueryError(f"bad filter {expr!r}: {e}") from None
    count = _int(q, "count", 0, MAX_COUNT) or 0
    max_bytes = _int(q, "max_bytes", 0, 1 << 40) or 0
    duration = q.get("duration", "").strip()
    deadline = 0.0
    if duration:
        try:
            seconds = float(duration)
        except ValueError:
            raise QueryError(f"duration must be seconds, got {duration!r}") from None
        if not 0 < seconds <= 7 * 86400:
            raise QueryError(f"duration must be in (0, 604800] seconds, got {seconds}")
        deadline = now + seconds
    flt = TapFilter(side=side, direction=direction, verdict=verdict, reason=reason, peer=peer,
                    match_inner=program.match if program is not None else None)
    return TapSubscriber(filter=flt, count=count, max_bytes=max_bytes, deadline=deadline)


def probe(q: Mapping[str, str]) -> Probe:
    """The explain probe of a query (QueryError if it is wrong)."""
    src, dst = _addr(q, "src", True), _addr(q, "dst", True)
    assert src is not None and dst is not None
    mac_text = q.get("inner_dst_mac", "").strip()
    try:
        mac = mac_from_str(mac_text) if mac_text else None
    except DataplaneError as e:
        raise QueryError(f"inner_dst_mac: {e}") from None
    try:
        return Probe(src, dst, proto=q.get("proto") or "icmp", dport=_int(q, "dport", 0, 65535),
                     sport=_int(q, "sport", 0, 65535), size=_int(q, "size", 20, 65535),
                     outer_src=_addr(q, "outer_src"), vni=_int(q, "vni", 0, (1 << 24) - 1),
                     inner_dst_mac=mac)
    except ValueError as e:
        raise QueryError(str(e)) from None


def node_json(node: NodeView, now: float) -> dict[str, Any]:
    """The ``/debug/node`` document."""
    return node.to_json(now)


def engine_node(engine: AnyEngine) -> NodeView:
    """A standalone engine's view: its config and static peers, no network, no leases."""
    c = engine.config
    return NodeView(subnet=c.subnet, public_ip=c.public_ip, vtep_mac=c.vtep_mac,
                    backend="vxlan (standalone engine)", peers=engine.fib.peers,
                    tun=engine.tun_name, vni=c.vni, port=c.port, mtu=c.mtu,
                    check_inner_source=c.check_inner_source,
                    source_ports=engine_source_ports(engine))


def engine_source_ports(engine: AnyEngine) -> tuple[int, ...] | None:
    """An in-process engine's lane ports; None for a worker pool (each worker has its own)."""
    return engine.source_ports if isinstance(engine, Engine) else None


def supervisor_engines(dp: Supervisor) -> list[AnyEngine]:
    return [dp.engine] if isinstance(dp.engine, (Engine, EnginePool)) else []


def supervisor_node(dp: Supervisor, watcher: PeerWatcher | None,
                    generation: ConfigGeneration | None = None) -> NodeView:
    """An agent's view: its lease, network config (and its generation, from the config
    follower), peers with paths and their lease expiry."""
    engine = dp.engine if isinstance(dp.engine, (Engine, EnginePool)) else None
    b = dp.config.backend
    leases = watcher.peers if watcher is not None else {}
    return NodeView(
        subnet=dp.lease.subnet if dp.lease else None, public_ip=dp.public_ip,
        vtep_mac=dp.vtep_mac, network=dp.config.network, backend=str(b.type),
        direct_routing=b.direct_routing, peers=dp.peers,
        lease_expiry={s: le.expiration for s, le in leases.items()},
        tun=engine.tun_name if engine is not None else None,
        vni=engine.config.vni if engine is not None else (b.vni or 1),
        port=engine.config.port if engine is not None else VXLAN_PORT, mtu=dp.mtu,
        check_inner_source=engine.config.check_inner_source if engine is not None else True,
        generation=generation,
        source_ports=engine_source_ports(engine) if engine is not None else ())


def agent_streams(dp: Supervisor, watcher: Callable[[], PeerWatcher | None],
                  generation: GenerationSource = lambda: None) -> dict[str, StreamHandler]:
    """The debug routes of an agent (``watcher`` gives the peer watch once it exists,
    ``generation`` the config follower's :attr:`~control.follower.ConfigFollower.generation`)."""
    return DebugApi(lambda: supervisor_engines(dp),
                    lambda: supervisor_node(dp, watcher(), generation())).streams()


class DebugApi:
    """The /debug/* handlers over a source of live engines and of the node's view."""

    def __init__(self, engines: EngineSource, node: NodeSource, *, poll: float = 0.05,
                 route_get: RouteGet = netlink.route_get,
                 clock: Callable[[], float] = time.time) -> None:
        self._engines = engines
        self._node = node
        self._poll = poll
        self._route_get = route_get
        self._clock = clock

    def streams(self) -> dict[str, StreamHandler]:
        return {"/debug/node": self.node, "/debug/drops": self.drops,
                "/debug/capture": self.capture, "/debug/trace": self.trace,
                "/debug/explain": self.explain}

    # ---- plain documents ------------------------------------------------------------------
    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes) -> None:
        writer.write(response_head(status, ctype, len(body)) + body)
        await writer.drain()

    async def _json(self, writer: asyncio.StreamWriter, doc: object, status: int = 200) -> None:
        await self._send(writer, status, "application/json",
                         json.dumps(doc, indent=1).encode() + b"\n")

    async def _error(self, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        await self._send(writer, status, "text/plain", text.encode() + b"\n")

    async def node(self, q: Mapping[str, str], reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        await self._json(writer, node_json(self._node(), self._clock()))

    async def drops(self, q: Mapping[str, str], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        reason = q.get("reason") or None
        if reason is not None and reason not in REASONS:
            await self._error(writer, 400, f"unknown drop reason {reason!r}; known: "
                              f"{', '.join(REASONS)}")
            return
        engines = self._engines()
        records = sorted((r for e in engines for r in e.recorder.records(reason)),
                         key=lambda r: r.ts_ns)
        held: dict[str, int] = {}
        for e in engines:
            for k, v in e.recorder.reasons().items():
                held[k] = held.get(k, 0) + v
        first = engines[0] if engines else None
        await self._json(writer, {
            "engine": first is not None,
            "public_ip": str(first.config.public_ip) if first else None,
            "port": first.config.port if first else None,
            "per_reason": first.recorder.per_reason if first else None,
            "snaplen": first.recorder.snaplen if first else None,
            "held": held, "records": [drop_json(r) for r in records]})

    async def explain(self, q: Mapping[str, str], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            pr = probe(q)
        except QueryError as e:
            await self._error(writer, 400, str(e))
            return
        node = self._node()
        need = lookups_needed(node, pr)
        error = None
        try:
            lookups = await asyncio.to_thread(self._route_get, need)
        except netlink.NetlinkError as e:
            lookups, error = dict.fromkeys(need), str(e)
        now = self._clock()
        doc = explain(node, pr, lookups, now).to_json(node, now)
        doc["probe"] = {k: v for k, v in q.items() if v}
        if error:
            doc["route_lookup_error"] = error
        await self._json(writer, doc)

    # ---- streams --------------------------------------------------------------------------
    async def capture(self, q: Mapping[str, str], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        buf = io.BytesIO()
        files: list[CaptureFile] = []

        def start(sub: TapSubscriber, engines: Sequence[AnyEngine]) -> bytes:
            port = engines[0].config.port
            files.append(CaptureFile(buf, sub.filter.side, port=port,
                                     comment=f"flannelette capture: {_describe(q)}"))
            return _take(buf)

        def render(records: list[TapRecord]) -> bytes:
            for r in records:
                files[0].write_tap(r)
            return _take(buf)

        def end(sub: TapSubscriber, why: str) -> bytes:
            files[0].write_lost(time.time_ns(), sub.lost)
            return _take(buf)
        await self._stream(q, reader, writer, PCAPNG, start, render, end)

    async def trace(self, q: Mapping[str, str], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        def render(records: list[TapRecord]) -> bytes:
            return b"".join(json.dumps(tap_json(r)).encode() + b"\n" for r in records)

        def end(sub: TapSubscriber, why: str) -> bytes:
            return json.dumps({"end": why, "records": sub.taken, "lost": sub.lost}).encode() + b"\n"
        await self._stream(q, reader, writer, JSONL, lambda s, e: b"", render, end)

    async def _stream(self, q: Mapping[str, str], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, ctype: str,
                      start: Callable[[TapSubscriber, Sequence[AnyEngine]], bytes],
                      render: Callable[[list[TapRecord]], bytes],
                      end: Callable[[TapSubscriber, str], bytes]) -> None:
        """Attach, stream until done/expired/engine gone/client gone, detach (always)."""
        try:
            sub = subscriber(q, time.monotonic())
        except QueryError as exc:
            await self._error(writer, 400, str(exc))
            return
        engines = list(self._engines())
        if not engines:
            await self._error(writer, 503, "no userspace VXLAN engine on this node (backend "
                              "host-gw, or not started yet): nothing to tap")
            return
        attached: list[AnyEngine] = []
        gone = asyncio.ensure_future(_client_gone(reader))
        try:
            for e in engines:
                e.add_tap(sub)
                attached.append(e)
            writer.write(response_head(200, ctype) + start(sub, engines))
            await writer.drain()
            why = ""
            while not why:
                current = self._engines()
                for e in current:
                    if not any(e is a for a in attached):
                        e.add_tap(sub)
                        attached.append(e)
                records = sub.drain()
                if records:
                    writer.write(render(records))
                    await writer.drain()
                # no await between drain() and these checks: nothing queued in between
                if sub.done:
                    why = "bound reached"
                elif sub.expired(time.monotonic()):
                    why = "duration over"
                elif not current:
                    why = "engine stopped"
                elif gone.done():
                    return
                else:
                    await asyncio.wait({gone}, timeout=self._poll)
            writer.write(end(sub, why))
            await writer.drain()
        finally:
            gone.cancel()
            for e in attached:
                e.remove_tap(sub)


async def _client_gone(reader: asyncio.StreamReader) -> None:
    """Returns when the client closes its side (after the request, it sends nothing)."""
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(4096):
            pass


def _take(buf: io.BytesIO) -> bytes:
    data = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return data


def _describe(q: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(q.items()) if v) or "everything"
