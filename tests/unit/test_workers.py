"""The worker pool without processes: the real parent (EnginePool) and the real worker
side (dataplane.worker.serve) over in-process socketpairs, each worker an Engine on
fake devices. Fan-out of peer sets, aggregated snapshots, restarts with a retired
base, taps forwarded and merged, the flight recorder merged, start failures; and the
pure protocol pieces."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import pickle
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP

from dataplane.bpf import compile_filter
from dataplane.engine import Engine, EngineConfig
from dataplane.errors import ConfigError, DeviceError
from dataplane.fib import FibError, Path, Peer
from dataplane.stats import EngineStats, PeerCounters
from dataplane.tap import TapFilter, TapSubscriber
from dataplane.worker import serve
from dataplane.workers import (
    EnginePool,
    PoolState,
    ProtocolError,
    config_from_wire,
    config_to_wire,
    decode,
    encode,
    filter_from_wire,
    filter_to_wire,
    merge_stats,
    peers_from_wire,
    peers_to_wire,
)
from tests.devices import FakeTun, FakeUdp

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
PEER_A = Peer(NET("10.244.2.0/24"), ADDR("10.10.1.2"), bytes.fromhex("0a0000000002"))
PEER_B = Peer(NET("10.244.3.0/24"), ADDR("10.10.1.3"), bytes.fromhex("0a0000000003"),
              partial_csum=True)
CONFIG = EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC, mtu=1450)


def icmp(dst: str = "10.244.2.2", size: int = 56) -> bytes:
    return bytes(IP(src="10.244.1.2", dst=dst) / ICMP() / (b"x" * size))


class _Handle:
    def __init__(self, task: asyncio.Task[int], writer: asyncio.StreamWriter, pid: int) -> None:
        self._task = task
        self._writer = writer
        self.pid = pid
        self.killed = False

    async def wait(self) -> int | None:
        with contextlib.suppress(asyncio.CancelledError):
            return await self._task
        return -9

    def kill(self) -> None:
        """As SIGKILL: the channel goes at once (no last counters), the task ends."""
        self.killed = True
        self._writer.transport.abort()
        self._task.cancel()


class InProcess:
    """A spawner whose workers are serve() tasks over socketpairs, engines on fakes."""

    def __init__(self, fail: str | None = None) -> None:
        self.engines: dict[int, list[Engine]] = {}
        self.handles: dict[int, list[_Handle]] = {}
        self.fail = fail
        self._pid = 1000

    def engine(self, index: int) -> Engine:
        return self.engines[index][-1]

    async def __call__(self, index: int, sock: socket.socket) -> _Handle:
        mine = sock.dup()  # the pool closes its copy of the worker's end after spawning
        mine.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=mine)

        def make(config: EngineConfig) -> Engine:
            assert config.shared_devices
            if self.fail:
                raise DeviceError(self.fail)
            e = Engine(config, FakeTun(), FakeUdp())
            self.engines.setdefault(index, []).append(e)
            return e
        self._pid += 1
        h = _Handle(asyncio.create_task(serve(reader, writer, make)), writer, self._pid)
        self.handles.setdefault(index, []).append(h)
        return h


def run_pool(test: Callable[[EnginePool, InProcess], Awaitable[None]], workers: int = 2,
             spawner: InProcess | None = None) -> None:
    async def main() -> None:
        sp = spawner or InProcess()
        pool = EnginePool(CONFIG, workers, spawn=sp, hold_tun=False, stats_interval=0.05,
                          restart_base=0.01, start_timeout=5.0)
        pool.set_peers([PEER_A])
        await pool.start()
        try:
            await test(pool, sp)
        finally:
            await pool.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def send_icmp(engine: Engine, n: int, dst: str = "10.244.2.2") -> None:
    tun = engine._tun
    assert isinstance(tun, FakeTun)
    for _ in range(n):
        tun.queue_packet(icmp(dst))
    engine.tun_readable()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


# ---- fan-out and aggregation -------------------------------------------------------------
def test_peer_sets_reach_every_worker() -> None:
    async def test(pool: EnginePool, sp: InProcess) -> None:
        for i in range(3):  # the set given before start came with init
            assert sp.engine(i).fib.peers == (PEER_A,)
        direct = Peer(NET("10.244.4.0/24"), ADDR("10.10.1.4"), None, Path.DIRECT)
        pool.set_peers([PEER_B, PEER_A, direct])
        await pool.refresh()  # answered after the peer set: messages are in order
        for i in range(3):
            assert sp.engine(i).fib.peers == (PEER_A, PEER_B, direct)
            assert set(sp.engine(i).snapshot().peers) == {"10.244.2.0/24", "10.244.3.0/24"}
        assert pool.fib.peers == (PEER_A, PEER_B, direct)
        with pytest.raises(FibError):  # refused in the parent, as the engine refuses it
            pool.set_peers([PEER_A, PEER_A])
        assert pool.fib.peers == (PEER_A, PEER_B, direct)
    run_pool(test, workers=3)


def test_snapshot_sums_workers() -> None:
    async def test(pool: EnginePool, sp: InProcess) -> None:
        send_icmp(sp.engine(0), 3)
        send_icmp(sp.engine(1), 2)
        send_icmp(sp.engine(1), 1, dst="10.244.99.1")  # no peer: a drop + ICMP unreachable
        st = await pool.refresh()
        assert st.workers == 2 and st.worker_restarts == 0
        a = st.peers["10.244.2.0/24"]
        assert a.tx_packets == 5 and a.tx_bytes == 5 * len(icmp())
        assert st.drops["no_route"] == 1 and st.icmp_unreachable == 1
        assert st.peer_drops[("no_route", "-", "tx")] == 1
        assert st.tun_packets == 6
        assert st.tun_max_batch == 3  # the largest batch of any worker, not a sum
        per = {w["index"]: w for w in st.per_worker}
        assert per[0]["tx_packets"] == 3 and per[1]["tx_packets"] == 2
        assert per[1]["drops"] == 1 and all(w["alive"] for w in per.values())
        assert st.tx_path == "udp-gso"
        d = st.to_dict()
        assert d["workers"] == 2 and d["per_worker"][0]["tx_packets"] == 3
        assert EngineStats.from_dict(d).peers["10.244.2.0/24"].tx_packets == 5
    run_pool(test)


def test_dead_worker_is_restarted_counted_and_its_counters_kept() -> None:
    async def test(pool: EnginePool, sp: InProcess) -> None:
        send_icmp(sp.engine(0), 4)
        send_icmp(sp.engine(1), 1)
        before = await pool.refresh()
        assert before.peers["10.244.2.0/24"].tx_packets == 5
        old = sp.engine(0)
        await pool.kill_worker(0)
        await until(lambda: len(sp.engines[0]) == 2 and pool.state.slots[0].ready)
        st = pool.snapshot()
        assert st.worker_restarts == 1 and st.per_worker[0]["restarts"] == 1
        assert st.peers["10.244.2.0/24"].tx_packets == 5  # the dead one's 4 are retired
        new = sp.engine(0)
        assert new is not old and new.fib.peers == (PEER_A,)  # peers on restart
        send_icmp(new, 2)
        st = await pool.refresh()
        assert st.peers["10.244.2.0/24"].tx_packets == 7
        assert st.per_worker[0]["tx_packets"] == 2  # the new process's own counters
        pool.set_peers([PEER_A, PEER_B])
        await pool.refresh()
        assert set(new.fib.peers) == {PEER_A, PEER_B}
    run_pool(test)


def test_close_keeps_the_last_counters() -> None:
    async def main() -> None:
        sp = InProcess()
        pool = EnginePool(CONFIG, 2, spawn=sp, hold_tun=False, stats_interval=10.0)
        pool.set_peers([PEER_A])
        await pool.start()
        send_icmp(sp.engine(0), 2)
        send_icmp(sp.engine(1), 3)  # not pushed yet: the interval is long
        await pool.close()
        st = pool.snapshot()
        assert st.peers["10.244.2.0/24"].tx_packets == 5 and st.worker_restarts == 0
        assert not any(h.killed for hs in sp.handles.values() for h in hs)
    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_worker_that_cannot_start_fails_start() -> None:
    async def main() -> None:
        pool = EnginePool(CONFIG, 2, spawn=InProcess(fail="cannot bind UDP 10.10.1.1:8472"),
                          hold_tun=False)
        with pytest.raises(DeviceError, match=r"worker 0: cannot bind UDP 10\.10\.1\.1:8472"):
            await pool.start()
        assert pool.snapshot().worker_restarts == 0
    asyncio.run(asyncio.wait_for(main(), 30))
    with pytest.raises(ConfigError):
        EnginePool(CONFIG, 1)


# ---- taps and the flight recorder ----------------------------------------------------------
def test_taps_reach_every_worker_and_records_merge() -> None:
    async def test(pool: EnginePool, sp: InProcess) -> None:
        sub = TapSubscriber(filter=TapFilter(direction="tx",
                                             match_inner=compile_filter("icmp").match), count=5)
        pool.add_tap(sub)
        assert pool.taps_active == 1
        await pool.refresh()
        for i in range(2):
            assert sp.engine(i).taps_active == 1
            flt = sp.engine(i)._taps.subscribers[0].filter  # the pcap filter travelled
            assert flt.match_inner is not None and flt.direction == "tx"
        send_icmp(sp.engine(0), 2)
        send_icmp(sp.engine(1), 2)
        await until(lambda: len(sub.queue) == 4)
        recs = sub.drain()
        assert len({r.packet_id for r in recs}) == 4  # renumbered: workers' ids collide
        assert {r.peer for r in recs} == {"10.244.2.0/24"} and all(r.inner for r in recs)
        send_icmp(sp.engine(1), 3)  # the bound (5) is reached in the parent
        await until(lambda: sub.done)
        await until(lambda: all(sp.engine(i).taps_active == 0 for i in range(2)))
        assert len(sub.queue) == 1 and pool.taps_active == 0
        # a filter that is not a pcap program is applied by the parent
        odd = TapSubscriber(filter=TapFilter(match_inner=lambda b: len(b) > 100))
        pool.add_tap(odd)
        await pool.refresh()
        send_icmp(sp.engine(0), 1, dst="10.244.2.3")
        send_icmp(sp.engine(0), 1)
        sp.engine(0)._tun.queue_packet(icmp(size=200))  # type: ignore[union-attr]
        sp.engine(0).tun_readable()
        await until(lambda: len(odd.queue) == 1)
        assert len(odd.queue[0].inner or b"") > 100
        pool.remove_tap(odd)
        await pool.refresh()
        assert sp.engine(0).taps_active == 0 and pool.taps_active == 0
    run_pool(test)


def test_recorder_merges_workers_by_time() -> None:
    async def test(pool: EnginePool, sp: InProcess) -> None:
        send_icmp(sp.engine(1), 1, dst="10.244.98.1")
        send_icmp(sp.engine(0), 2, dst="10.244.99.1")
        await pool.refresh()
        recs = pool.recorder.records()
        assert len(recs) == 3 and [r.ts_ns for r in recs] == sorted(r.ts_ns for r in recs)
        assert {r.reason for r in recs} == {"no_route"}
        assert pool.recorder.reasons() == {"no_route": 3}
        assert len(pool.recorder.records("no_route")) == 3
        assert pool.recorder.records("bad_flags") == []
        await pool.refresh()  # nothing new: nothing sent twice
        assert len(pool.recorder.records()) == 3
        assert pool.recorder.per_reason == 32 and pool.recorder.snaplen == 2048
    run_pool(test)


# ---- pure parts ------------------------------------------------------------------------------
def test_messages_round_trip_and_refuse_objects() -> None:
    msg: dict[str, Any] = {"op": "tap", "records": [(1, b"\x00\xff", None, "x")], "n": 3}
    data = encode(msg)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode(data[4:]) == msg
    with pytest.raises(ProtocolError, match="only plain data"):
        decode(pickle.dumps({"op": "x", "a": ADDR("10.0.0.1")}))
    with pytest.raises(ProtocolError, match="without an op"):
        decode(pickle.dumps([1, 2]))
    with pytest.raises(ProtocolError, match="undecodable"):
        decode(b"\x80\x05garbage")


def test_codecs_round_trip() -> None:
    cfg = EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC, vni=7, mtu=1400,
                       offload=True, tunnel_gso="off", shared_devices=True)
    assert config_from_wire(decode(encode({"op": "c", **config_to_wire(cfg)})[4:])) == cfg
    direct = Peer(NET("10.244.4.0/24"), ADDR("10.10.1.4"), None, Path.DIRECT)
    assert peers_from_wire(peers_to_wire([PEER_A, PEER_B, direct])) == [PEER_A, PEER_B, direct]
    prog = compile_filter("tcp port 80")
    wire, parent = filter_to_wire(TapFilter(side="inner", peer="10.244.2.0/24",
                                            match_inner=prog.match))
    assert not parent and wire["expr"] == "tcp port 80"
    back = filter_from_wire(wire)
    assert back.side == "inner" and back.peer == "10.244.2.0/24"
    assert back.match_inner is not None
    assert back.match_inner.__self__.insns == prog.insns  # type: ignore[attr-defined]
    assert filter_to_wire(TapFilter(match_inner=lambda b: True))[1]


def test_merge_stats_and_retired_base() -> None:
    a = EngineStats(peers={"p": PeerCounters(1, 10, 2, 20), "old": PeerCounters(5, 5, 5, 5)},
                    drops={"no_route": 1}, peer_drops={("no_route", "-", "tx"): 1},
                    tun_packets=3, tun_max_batch=7, tx_path="tunnel-gso", tunnel_gso="on")
    b = EngineStats(peers={"p": PeerCounters(3, 30, 4, 40)}, drops={"no_route": 2, "x": 1},
                    peer_drops={("no_route", "-", "tx"): 2}, tun_packets=4, tun_max_batch=5,
                    tx_path="tso-split+udp-gso", tunnel_gso="on")
    m = merge_stats([a, b], ["p"])
    assert m["peers"] == {"p": PeerCounters(4, 40, 6, 60)}
    assert m["drops"] == {"no_route": 3, "x": 1}
    assert m["peer_drops"] == {("no_route", "-", "tx"): 3}
    assert m["tun_packets"] == 7 and m["tun_max_batch"] == 7
    assert m["tx_path"] == "tunnel-gso | tso-split+udp-gso" and m["tunnel_gso"] == "on"
    state = PoolState(2)
    state.set_peers([Peer(NET("10.0.1.0/24"), ADDR("10.10.1.2"), OWN_MAC)])
    for i, st in enumerate((a, b)):
        state.started(i, 10 + i)
        state.handle(i, {"op": "stats", "stats": EngineStats(
            peers={"10.0.1.0/24": st.peers["p"]}, tun_packets=st.tun_packets).to_dict()})
    assert state.snapshot().tun_packets == 7
    state.died(0)
    state.started(0, 12)
    st = state.snapshot()
    assert st.tun_packets == 7 and st.worker_restarts == 1
    assert st.peers["10.0.1.0/24"] == PeerCounters(4, 40, 6, 60)
    assert [w["pid"] for w in st.per_worker] == [12, 11]
    state.handle(0, {"op": "stats", "stats": EngineStats(tun_packets=1).to_dict()})
    assert state.snapshot().tun_packets == 8


def test_workers_flags() -> None:
    from control.errors import FlagError
    from control.options import parse_args
    from dataplane.standalone import _parser

    assert parse_args([], {}).workers == 1
    assert parse_args(["--workers", "3"], {}).workers == 3
    assert parse_args([], {"FLANNELD_WORKERS": "2"}).workers == 2
    for bad in ("0", "65"):
        with pytest.raises(FlagError, match=r"--workers must be in 1\.\.64"):
            parse_args(["--workers", bad], {})
    args = _parser().parse_args(["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1",
                                 "--workers", "2"])
    assert args.workers == 2
