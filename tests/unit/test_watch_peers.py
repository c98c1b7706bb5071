"""The peer watch against the in-memory registry with a fake clock."""

from __future__ import annotations

import asyncio
import ipaddress
import random

from control.backoff import Backoff
from control.config import BackendType
from control.lease import LeaseAttrs, encode_attrs
from control.watch import PeerMap, PeerWatcher
from tests.fakes import FakeClock, InMemoryRegistry, run_async

N = ipaddress.IPv4Network
OWN = N("10.5.1.0/24")


def value(ip: str, mac: int = 1, btype: str = "vxlan") -> str:
    return encode_attrs(LeaseAttrs(ipaddress.IPv4Address(ip), btype, 1,
                                   bytes([2, 0, 0, 0, 0, mac])))


class Harness:
    def __init__(self, window: int = 1000) -> None:
        self.clock = FakeClock()
        self.reg = InMemoryRegistry(self.clock, window=window)
        self.handed: list[dict[N, str]] = []
        self.lost = 0
        self.task: asyncio.Future[None] | None = None
        self.watcher = PeerWatcher(
            self.reg, backend_type=BackendType.VXLAN, own_subnet=lambda: OWN,
            on_peers=self._peers, on_own_lease_lost=self._lost, clock=self.clock,
            sleep=self.clock.sleep, backoff=Backoff(rng=random.Random(1)), watch_timeout=1.0,
            own_public_ip=lambda: ipaddress.IPv4Address("10.10.1.1"))

    def _peers(self, peers: PeerMap) -> None:
        self.handed.append({s: str(le.attrs.public_ip) for s, le in peers.items()})

    def _lost(self) -> None:
        self.lost += 1

    async def settle(self, steps: int = 20) -> None:
        """Let the one watcher task run a few steps (asyncio.run cancels it at the end)."""
        if self.task is None:
            self.task = asyncio.ensure_future(self.watcher.run())
        for _ in range(steps):
            await asyncio.sleep(0)

    @property
    def last(self) -> dict[N, str]:
        return self.handed[-1]


@run_async
async def test_add_change_remove_and_own_lease_filtered() -> None:
    h = Harness()
    h.reg.set(OWN, value("10.10.1.1"))
    h.reg.set(N("10.5.2.0/24"), value("10.10.1.2"))
    await h.settle()
    assert h.last == {N("10.5.2.0/24"): "10.10.1.2"}
    h.reg.set(N("10.5.3.0/24"), value("10.10.1.3"))
    await h.settle()
    assert h.last == {N("10.5.2.0/24"): "10.10.1.2", N("10.5.3.0/24"): "10.10.1.3"}
    h.reg.set(N("10.5.3.0/24"), value("10.10.1.33"))
    await h.settle()
    assert h.last[N("10.5.3.0/24")] == "10.10.1.33"
    n = len(h.handed)
    h.reg.set(N("10.5.3.0/24"), value("10.10.1.33"))  # a renewal: same value
    await h.settle()
    assert len(h.handed) == n  # not handed out again
    h.reg.remove(N("10.5.2.0/24"))
    await h.settle()
    assert h.last == {N("10.5.3.0/24"): "10.10.1.33"}
    assert h.lost == 0


@run_async
async def test_other_backend_types_and_malformed_values_skipped(caplog) -> None:
    h = Harness()
    h.reg.set(N("10.5.2.0/24"), value("10.10.1.2", btype="host-gw"))
    h.reg.set(N("10.5.3.0/24"), "{not json")
    h.reg.set(N("10.5.4.0/24"), value("10.10.1.4"))
    await h.settle()
    assert h.last == {N("10.5.4.0/24"): "10.10.1.4"}
    assert "skipping malformed lease" in caplog.text and "10.5.3.0/24" in caplog.text


@run_async
async def test_own_lease_deleted_is_reported() -> None:
    h = Harness()
    h.reg.set(OWN, value("10.10.1.1"))
    await h.settle()
    h.reg.remove(OWN)
    await h.settle()
    assert h.lost == 1


@run_async
async def test_resync_after_window_overflow_loses_and_duplicates_nothing() -> None:
    h = Harness(window=50)
    for i in range(2, 12):
        h.reg.set(N(f"10.5.{i}.0/24"), value(f"10.10.1.{i}"))
    await h.settle()
    assert len(h.last) == 10
    # Many events while the watcher is not looking: its cursor falls out of the window.
    for round_ in range(20):
        for i in range(2, 12):
            h.reg.set(N(f"10.5.{i}.0/24"), value(f"10.10.1.{i}", mac=round_))
    h.reg.remove(N("10.5.2.0/24"))
    h.reg.set(N("10.5.20.0/24"), value("10.10.1.20"))
    await h.settle()
    assert h.watcher.resyncs >= 1
    want = {N(f"10.5.{i}.0/24"): f"10.10.1.{i}" for i in range(3, 12)}
    want[N("10.5.20.0/24")] = "10.10.1.20"
    assert h.last == want


@run_async
async def test_etcd_away_keeps_last_peer_set() -> None:
    h = Harness()
    h.reg.set(N("10.5.2.0/24"), value("10.10.1.2"))
    await h.settle()
    assert h.watcher.connected and h.watcher.reconnects == 0
    n = len(h.handed)
    h.reg.away = True
    await h.settle(50)
    assert not h.watcher.connected
    assert len(h.handed) == n  # nothing handed out: the dataplane keeps its peers
    assert h.watcher.backoff.failing_for(h.clock()) > 0
    h.reg.away = False
    h.reg.set(N("10.5.3.0/24"), value("10.10.1.3"))
    await h.settle()
    assert h.watcher.connected and h.watcher.reconnects == 1
    assert set(h.last) == {N("10.5.2.0/24"), N("10.5.3.0/24")}


@run_async
async def test_own_subnet_overwritten_by_another_node_is_lost() -> None:
    h = Harness()
    h.reg.set(OWN, value("10.10.1.1"))
    await h.settle()
    assert h.lost == 0
    h.reg.set(OWN, value("10.10.1.1", mac=9))  # our own republish: still ours
    await h.settle()
    assert h.lost == 0
    h.reg.set(OWN, value("10.10.1.99"))  # another node took the key
    await h.settle()
    assert h.lost == 1
    assert OWN not in h.last  # never a peer of ourselves


@run_async
async def test_own_lease_missing_from_a_relist_is_lost() -> None:
    h = Harness()
    await h.settle()
    assert h.lost == 1


@run_async
async def test_moving_to_another_subnet_republishes_the_peer_set() -> None:
    own = [OWN]
    h = Harness()
    h.watcher = PeerWatcher(
        h.reg, backend_type=BackendType.VXLAN, own_subnet=lambda: own[0], on_peers=h._peers,
        on_own_lease_lost=h._lost, clock=h.clock, sleep=h.clock.sleep, watch_timeout=1.0)
    h.reg.set(OWN, value("10.10.1.77"))  # someone else holds our old subnet now
    h.reg.set(N("10.5.9.0/24"), value("10.10.1.1"))  # our new lease
    await h.settle()
    own[0] = N("10.5.9.0/24")
    h.watcher.own_subnet_changed()
    assert h.last == {OWN: "10.10.1.77"}
