"""/debug/* on a real HealthServer over an engine on fake devices (no root).

Captures and traces stream while the engine's loops run; every way a stream can
end (bound, duration, client gone, bad query) leaves no tap attached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP

from control.debugapi import DebugApi, engine_node
from control.debugcli import DebugError, get_json, open_stream
from control.health import HealthServer
from control.reconcile import RouteLookup
from dataplane.engine import Engine, EngineConfig
from dataplane.fib import Peer
from dataplane.pcapng import Packet, read_pcapng
from dataplane.wire import build_frame
from tests.devices import FakeTun, FakeUdp

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
PEER_MAC = bytes.fromhex("0a0000000002")
PEER = Peer(NET("10.244.2.0/24"), ADDR("10.10.1.2"), PEER_MAC)


def _ping(src: str = "10.244.1.2", dst: str = "10.244.2.2", seq: int = 1) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(seq=seq) / (b"x" * 24))


def _fake_route_get(addrs: Sequence[ipaddress.IPv4Address]
                    ) -> dict[ipaddress.IPv4Address, tuple[RouteLookup, ...] | None]:
    return {a: (RouteLookup(None, "flannel.1"),) if a in NET("10.244.0.0/16")
            else (RouteLookup(None, "eth0"),) for a in addrs}


Scenario = Callable[[Engine, FakeTun, FakeUdp, int], Awaitable[None]]


def run(scenario: Scenario, engines: bool = True) -> None:
    """An engine on fake devices and a HealthServer with the debug routes, around ``scenario``."""
    async def main() -> None:
        tun, udp = FakeTun(name="flannel.1"), FakeUdp()
        e = Engine(EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC), tun, udp)
        await e.start()
        e.set_peers([PEER])
        api = DebugApi(lambda: [e] if engines else [], lambda: engine_node(e), poll=0.01,
                       route_get=_fake_route_get)
        server = HealthServer("127.0.0.1", 0, {}, api.streams())
        await server.start()
        try:
            await asyncio.wait_for(scenario(e, tun, udp, server.port), 20)
        finally:
            await server.close()
            await e.close()
    asyncio.run(main())


async def _traffic(e: Engine, tun: FakeTun, udp: FakeUdp, n: int, until: Callable[[], bool]
                   ) -> None:
    """A ping each way every 10 ms until ``until()`` (bounded by ``n`` rounds)."""
    for i in range(n):
        if until():
            return
        if e.taps_active:
            tun.queue_packet(_ping(seq=i))
            udp.queue(build_frame(1, OWN_MAC, PEER_MAC, _ping("10.244.2.2", "10.244.1.2", i)),
                      "10.10.1.2")
            e.tun_readable()
            e.udp_readable()
        await asyncio.sleep(0.01)


def test_capture_streams_pcapng_until_its_count_and_detaches() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        def client() -> bytes:
            resp = open_stream("127.0.0.1", port, "/debug/capture", {"count": 4, "side": "both"},
                               stream=True)
            return resp.read()
        fut = asyncio.ensure_future(asyncio.to_thread(client))
        await _traffic(e, tun, udp, 500, fut.done)
        data = await fut
        recs = read_pcapng(data)
        packets = [r for r in recs if isinstance(r, Packet)]
        assert len(packets) == 8  # 4 records, each an outer frame and an inner packet
        assert e.taps_active == 0
    run(scenario)


def test_trace_ends_with_a_summary_line_after_its_duration() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        def client() -> list[dict[str, Any]]:
            resp = open_stream("127.0.0.1", port, "/debug/trace",
                               {"duration": 0.3, "direction": "rx"}, stream=True)
            return [json.loads(line) for line in resp.read().splitlines()]
        fut = asyncio.ensure_future(asyncio.to_thread(client))
        await _traffic(e, tun, udp, 500, fut.done)
        lines = await fut
        assert lines[-1]["end"] == "duration over" and lines[-1]["lost"] == 0
        body = lines[:-1]
        assert body and all(d["direction"] == "rx" and d["verdict"] == "forwarded"
                            for d in body)
        assert lines[-1]["records"] == len(body)
        assert IP(bytes.fromhex(body[0]["inner"])).src == "10.244.2.2"
        assert e.taps_active == 0
    run(scenario)


def test_client_going_away_removes_the_tap() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /debug/capture?filter=icmp HTTP/1.0\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"application/x-pcapng" in head
        for _ in range(100):
            if e.taps_active:
                break
            await asyncio.sleep(0.01)
        assert e.taps_active == 1
        writer.transport.abort()  # the client vanishes without a word
        for _ in range(200):
            if not e.taps_active:
                break
            await asyncio.sleep(0.01)
        assert e.taps_active == 0 and not e._taps.subscribers
    run(scenario)


def test_bad_queries_are_400_and_attach_nothing() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        def client(params: dict[str, object]) -> str:
            with pytest.raises(DebugError) as info:
                open_stream("127.0.0.1", port, "/debug/capture", params)
            return str(info.value)
        assert "HTTP 400" in await asyncio.to_thread(client, {"filter": "tcp port"})
        assert "side must be" in await asyncio.to_thread(client, {"side": "middle"})
        assert "unknown drop reason" in await asyncio.to_thread(client, {"reason": "gremlins"})
        assert "peer must be a subnet" in await asyncio.to_thread(client, {"peer": "x"})
        assert e.taps_active == 0 and not e._taps.subscribers
    run(scenario)


def test_no_engine_is_503_with_a_reason() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        def client() -> str:
            with pytest.raises(DebugError) as info:
                open_stream("127.0.0.1", port, "/debug/trace", {})
            return str(info.value)
        text = await asyncio.to_thread(client)
        assert "HTTP 503" in text and "no userspace VXLAN engine" in text
    run(scenario, engines=False)


def test_drops_node_and_explain_documents() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        udp.queue(b"\x00" * 30, "10.10.1.2")  # bad flags from the peer
        tun.queue_packet(_ping(dst="10.244.9.9"))  # no route
        e.udp_readable()
        e.tun_readable()
        doc = await asyncio.to_thread(get_json, "127.0.0.1", port, "/debug/drops", {})
        assert doc["public_ip"] == "10.10.1.1" and doc["per_reason"] == 32
        assert [(r["reason"], r["direction"]) for r in doc["records"]] == [
            ("bad_flags", "rx"), ("no_route", "tx")]
        only = await asyncio.to_thread(get_json, "127.0.0.1", port, "/debug/drops",
                                       {"reason": "no_route"})
        assert [r["reason"] for r in only["records"]] == ["no_route"]
        node = await asyncio.to_thread(get_json, "127.0.0.1", port, "/debug/node", {})
        assert node["vtep_mac"] == "0a:00:00:00:00:01" and node["tun"] == "flannel.1"
        assert node["peers"][0]["vtep_mac"] == "0a:00:00:00:00:02"
        ex = await asyncio.to_thread(get_json, "127.0.0.1", port, "/debug/explain",
                                     {"src": "10.244.1.2", "dst": "10.244.2.7"})
        assert ex["verdict"] == "vxlan" and ex["peer"]["public_ip"] == "10.10.1.2"
        ex = await asyncio.to_thread(get_json, "127.0.0.1", port, "/debug/explain",
                                     {"src": "10.244.1.2", "dst": "10.244.9.7"})
        assert (ex["verdict"], ex["reason"]) == ("no-route", "no_route")
    run(scenario)


def test_unreachable_node_is_one_clear_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(DebugError) as info:
            get_json("127.0.0.1", port, "/debug/node", {}, timeout=1)
    text = str(info.value)
    assert "no flannelette agent or engine answers" in text and "\n" not in text
    assert f"--healthz-port {port}" in text


def test_a_quiet_stream_outlives_the_connect_timeout() -> None:
    async def scenario(e: Engine, tun: FakeTun, udp: FakeUdp, port: int) -> None:
        def client() -> list[dict[str, Any]]:
            resp = open_stream("127.0.0.1", port, "/debug/trace",
                               {"duration": 0.8, "filter": "host 10.99.9.9"}, timeout=0.2,
                               stream=True)
            return [json.loads(line) for line in resp.read().splitlines()]
        fut = asyncio.ensure_future(asyncio.to_thread(client))
        await _traffic(e, tun, udp, 500, fut.done)
        lines = await fut
        assert lines == [{"end": "duration over", "records": 0, "lost": 0}]
    run(scenario)
