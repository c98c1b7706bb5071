"""The registries against a real etcd 3.4, under both APIs: config, leases, watch, resync."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import etcd as python_etcd
import pytest

from benchmarks.etcd import EtcdServer
from control.config import BackendType, parse_config
from control.errors import ConfigError, ConfigNotFound
from control.keeper import LeaseKeeper
from control.lease import LeaseAttrs, decode_attrs, decode_lease, encode_attrs
from control.registry import (
    ConfigWatch,
    EtcdOptions,
    Registry,
    WatchEvent,
    discover,
    open_api,
)
from control.watch import PeerMap, PeerWatcher

pytestmark = pytest.mark.etcd("etcdctl")

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
PREFIX = "/coreos.com/network"
SEED = '{"Network":"172.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'
FLANNEL_VALUE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
SMALL = parse_config('{"Network":"10.5.0.0/24","SubnetLen":29,"Backend":{"Type":"vxlan"}}')
APIS = [2, 3]


def opts(server: EtcdServer) -> EtcdOptions:
    return EtcdOptions(endpoints=(server.endpoint,), prefix=PREFIX, timeout=5.0)


def put(server: EtcdServer, api: int, key: str, value: str, ttl: int | None = None) -> None:
    """Write as flannel users and flannel itself do, with etcdctl."""
    if api == 2:
        extra = ["--ttl", str(ttl)] if ttl else []
        server.etcdctl("set", key, value, *extra, api=2)
    else:
        server.etcdctl("put", key, value, api=3)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def vx(ip: str, mac: int) -> LeaseAttrs:
    return LeaseAttrs(A(ip), "vxlan", 1, bytes([2, 0, 0, 0, 0, mac]))


# ---- config --------------------------------------------------------------------------------
def test_seed_config_written_with_etcdctl_v2_is_found_and_parsed(etcd: EtcdServer) -> None:
    etcd.etcdctl("set", f"{PREFIX}/config", SEED, api=2)

    async def go() -> None:
        reg, text = await discover("auto", opts(etcd))
        try:
            assert reg.api == "v2" and text == SEED
            cfg = parse_config(text)
            assert cfg.backend.type == "vxlan" and cfg.backend.direct_routing
            assert str(cfg.network) == "172.7.0.0/16" and cfg.subnet_len == 24
        finally:
            await reg.close()
    run(go())


def test_auto_picks_v3_when_config_is_there(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", f"{PREFIX}/config", SEED, api=3)

    async def go() -> None:
        reg, text = await discover("auto", opts(etcd))
        await reg.close()
        assert reg.api == "v3" and text == SEED
        with pytest.raises(ConfigNotFound):  # asked for v2 explicitly: not there
            await discover("v2", opts(etcd))
    run(go())


def test_config_in_neither_api_names_both_etcdctl_commands(etcd: EtcdServer) -> None:
    async def go() -> str:
        with pytest.raises(ConfigNotFound) as info:
            await discover("auto", opts(etcd))
        return str(info.value)
    msg = run(go())
    assert f"ETCDCTL_API=3 etcdctl --endpoints {etcd.endpoint} put {PREFIX}/config" in msg
    assert f"ETCDCTL_API=2 etcdctl --endpoints {etcd.endpoint} set {PREFIX}/config" in msg


def test_every_config_rule_through_etcdctl_v2(etcd: EtcdServer) -> None:
    """Each bad config of the unit table, written as users do (`ETCDCTL_API=2 etcdctl
    set`), read back through the registry, gives its one clear message."""
    from tests.unit.test_config_rules import BAD_CONFIGS

    async def fetch() -> str:
        reg, text = await discover("v2", opts(etcd))
        await reg.close()
        return text
    for text, message in BAD_CONFIGS:
        etcd.etcdctl("set", f"{PREFIX}/config", text, api=2)
        stored = run(fetch())
        assert stored == text
        with pytest.raises(ConfigError) as info:
            parse_config(stored)
        assert message in str(info.value), (text, str(info.value))


@pytest.mark.parametrize("api", APIS)
def test_malformed_config_value_is_one_clear_error(etcd: EtcdServer, api: int) -> None:
    put(etcd, api, f"{PREFIX}/config", '{"Network":"172.7.0.0/16","SubnetLen":31,'
        '"Backend":{"Type":"vxlan"}}')

    async def go() -> str:
        reg, text = await discover("auto", opts(etcd))
        await reg.close()
        return text
    with pytest.raises(ConfigError, match="SubnetLen must be less than /31"):
        parse_config(run(go()))


# ---- leases --------------------------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_flannel_lease_is_read_and_ours_is_flannels_format(etcd: EtcdServer, api: int) -> None:
    put(etcd, api, f"{PREFIX}/subnets/172.7.34.0-24", FLANNEL_VALUE, ttl=86400)

    async def go() -> None:
        reg = open_api(f"v{api}", opts(etcd))
        try:
            snap = await reg.list_leases()
            leases = [decode_lease(r) for r in snap.leases]
            assert [(str(le.subnet), str(le.attrs.public_ip), le.attrs.vtep_mac)
                    for le in leases] == [("172.7.34.0/24", "192.168.64.3",
                                           bytes.fromhex("c6d2326f8f44"))]
            ours = vx("10.10.1.1", 0xab)
            expires = await reg.create_lease(N("172.7.35.0/24"), encode_attrs(ours), 86400)
            assert expires is not None and expires > time.time() + 86000
        finally:
            await reg.close()
    run(go())
    # Read back the way flannel (and its users) read it.
    key = f"{PREFIX}/subnets/172.7.35.0-24"
    got = etcd.etcdctl("get", key, api=api).stdout.strip().splitlines()[-1]
    doc = json.loads(got)
    assert doc == {"PublicIP": "10.10.1.1", "PublicIPv6": None, "BackendType": "vxlan",
                   "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:ab"}}
    if api == 2:
        ttl = python_etcd.Client(host="127.0.0.1", port=etcd.port).read(key).ttl
        assert 86000 < ttl <= 86400


@pytest.mark.parametrize("api", APIS)
def test_twenty_clients_racing_get_distinct_subnets(etcd: EtcdServer, api: int) -> None:
    async def go() -> list[N]:
        regs = [open_api(f"v{api}", opts(etcd)) for _ in range(20)]
        # The same rng seed everywhere: they all go for the same subnets first.
        keepers = [LeaseKeeper(r, SMALL, vx(f"10.10.1.{i + 1}", i), clock=time.time,
                               rng=random.Random(3)) for i, r in enumerate(regs)]
        try:
            leases = await asyncio.wait_for(
                asyncio.gather(*(k.acquire() for k in keepers)), 60)
        finally:
            for r in regs:
                await r.close()
        return [le.subnet for le in leases]
    subnets = run(go())
    assert len(set(subnets)) == 20 and all(SMALL.contains_subnet(s) for s in subnets)

    async def listed() -> set[N]:
        reg = open_api(f"v{api}", opts(etcd))
        snap = await reg.list_leases()
        await reg.close()
        return {r.subnet for r in snap.leases}
    assert run(listed()) == set(subnets)


@pytest.mark.parametrize("api", APIS)
def test_restart_keeps_subnet(etcd: EtcdServer, api: int) -> None:
    async def acquire(mac: int) -> N:
        reg = open_api(f"v{api}", opts(etcd))
        try:
            k = LeaseKeeper(reg, SMALL, vx("10.10.1.1", mac), clock=time.time)
            return (await k.acquire()).subnet
        finally:
            await reg.close()
    first = run(acquire(1))
    assert run(acquire(2)) == first
    key = f"{PREFIX}/subnets/{first.network_address}-{first.prefixlen}"
    value = etcd.etcdctl("get", key, api=api).stdout.strip().splitlines()[-1]
    assert decode_attrs(value).vtep_mac == bytes([2, 0, 0, 0, 0, 2])  # the new VtepMAC


@pytest.mark.parametrize("api", APIS)
def test_deleted_lease_is_reacquired_and_renewal_happens(etcd: EtcdServer, api: int) -> None:
    async def go() -> None:
        reg = open_api(f"v{api}", opts(etcd))
        k = LeaseKeeper(reg, SMALL, vx("10.10.1.1", 1), ttl=6, margin=3, clock=time.time)
        lease = await k.acquire()
        first_expiry = k.expires_at
        assert first_expiry is not None
        w = PeerWatcher(reg, backend_type=BackendType.VXLAN, own_subnet=lambda: k.subnet,
                        on_peers=lambda p: None, on_own_lease_lost=k.lost, clock=time.monotonic,
                        watch_timeout=2.0)
        tasks = [asyncio.ensure_future(k.run()), asyncio.ensure_future(w.run())]
        try:
            await until(lambda: k.renewals >= 1, 15)
            assert k.expires_at is not None and k.expires_at > first_expiry
            key = f"{PREFIX}/subnets/{lease.subnet.network_address}-{lease.subnet.prefixlen}"
            await asyncio.to_thread(etcd.etcdctl, "rm" if api == 2 else "del", key, api=api)
            await until(lambda: k.reacquisitions >= 1, 15)
            assert k.subnet == lease.subnet  # the same subnet again
            snap = await reg.list_leases()
            assert [r.subnet for r in snap.leases] == [lease.subnet]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await reg.close()
    run(go())


# ---- watch ---------------------------------------------------------------------------------
class Seen:
    def __init__(self) -> None:
        self.sets: list[dict[N, str]] = []

    def __call__(self, peers: PeerMap) -> None:
        self.sets.append({s: str(le.attrs.public_ip) for s, le in peers.items()})

    @property
    def last(self) -> dict[N, str]:
        return self.sets[-1] if self.sets else {}


def watcher(reg: Registry, seen: Seen) -> PeerWatcher:
    return PeerWatcher(reg, backend_type=BackendType.VXLAN, own_subnet=lambda: N("10.5.1.0/24"),
                       on_peers=seen, on_own_lease_lost=lambda: None, clock=time.monotonic,
                       watch_timeout=2.0)


def key(subnet: str) -> str:
    net = N(subnet)
    return f"{PREFIX}/subnets/{net.network_address}-{net.prefixlen}"


@pytest.mark.parametrize("api", APIS)
def test_watch_add_change_remove_own_filtered_malformed_skipped(
        etcd: EtcdServer, api: int, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        reg = open_api(f"v{api}", opts(etcd))
        seen = Seen()
        w = watcher(reg, seen)
        task = asyncio.ensure_future(w.run())
        try:
            await until(lambda: w.synced)
            await asyncio.to_thread(put, etcd, api, key("10.5.1.0/24"),
                                    encode_attrs(vx("10.10.1.1", 1)))
            await asyncio.to_thread(put, etcd, api, key("10.5.2.0/24"),
                                    encode_attrs(vx("10.10.1.2", 2)))
            await until(lambda: seen.last == {N("10.5.2.0/24"): "10.10.1.2"})
            await asyncio.to_thread(put, etcd, api, key("10.5.2.0/24"),
                                    encode_attrs(vx("10.10.1.22", 2)))
            await until(lambda: seen.last == {N("10.5.2.0/24"): "10.10.1.22"})
            await asyncio.to_thread(put, etcd, api, key("10.5.3.0/24"), "{garbage")
            await asyncio.to_thread(put, etcd, api, key("10.5.4.0/24"),
                                    encode_attrs(vx("10.10.1.4", 4)))
            await until(lambda: N("10.5.4.0/24") in seen.last)
            assert N("10.5.3.0/24") not in seen.last
            await asyncio.to_thread(etcd.etcdctl, "rm" if api == 2 else "del",
                                    key("10.5.2.0/24"), api=api)
            await until(lambda: seen.last == {N("10.5.4.0/24"): "10.10.1.4"})
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await reg.close()
    run(go())
    assert "skipping malformed lease" in caplog.text and "10.5.3.0/24" in caplog.text


def _burst_v2(server: EtcdServer, n: int) -> None:
    """n writes through the v2 API (faster than n etcdctl processes)."""
    c = python_etcd.Client(host="127.0.0.1", port=server.port)
    for i in range(n):
        c.write(key("10.5.9.0/24"), encode_attrs(vx("10.10.1.9", i % 250)))
    c.delete(key("10.5.9.0/24"))
    c.write(key("10.5.10.0/24"), encode_attrs(vx("10.10.1.10", 10)))
    c.delete(key("10.5.2.0/24"))


async def _burst_v3(server: EtcdServer, n: int) -> int:
    import aetcd
    async with aetcd.Client(host="127.0.0.1", port=server.port) as c:
        for i in range(n):
            await c.put(key("10.5.9.0/24").encode(),
                        encode_attrs(vx("10.10.1.9", i % 250)).encode())
        await c.delete(key("10.5.9.0/24").encode())
        await c.put(key("10.5.10.0/24").encode(), encode_attrs(vx("10.10.1.10", 10)).encode())
        await c.delete(key("10.5.2.0/24").encode())
        res = await c.get_prefix(b"/")
        return int(res.header.revision)


@pytest.mark.parametrize("api", APIS)
def test_resync_after_index_cleared_or_compaction(etcd: EtcdServer, api: int) -> None:
    """v2: >1000 events behind -> EventIndexCleared; v3: compacted -> re-list. The final
    peer set is exact: nothing lost, nothing twice."""
    for i in (2, 3):
        put(etcd, api, key(f"10.5.{i}.0/24"), encode_attrs(vx(f"10.10.1.{i}", i)))

    async def go() -> None:
        reg = open_api(f"v{api}", opts(etcd))
        seen = Seen()
        w = watcher(reg, seen)
        await w.relist()
        assert seen.last == {N("10.5.2.0/24"): "10.10.1.2", N("10.5.3.0/24"): "10.10.1.3"}
        old_cursor = w.cursor
        # The watcher is not looking while far more than 1000 events happen.
        if api == 2:
            await asyncio.to_thread(_burst_v2, etcd, 1100)
        else:
            rev = await _burst_v3(etcd, 300)
            await asyncio.to_thread(etcd.etcdctl, "compact", str(rev), api=3)
        task = asyncio.ensure_future(w.run())
        try:
            await until(lambda: w.resyncs >= 1 and w.cursor > old_cursor, 30)
            want = {N("10.5.3.0/24"): "10.10.1.3", N("10.5.10.0/24"): "10.10.1.10"}
            await until(lambda: seen.last == want, 30)
            assert sorted(w.peers) == sorted(want)
            # Still watching after the resync.
            await asyncio.to_thread(put, etcd, api, key("10.5.11.0/24"),
                                    encode_attrs(vx("10.10.1.11", 11)))
            await until(lambda: N("10.5.11.0/24") in seen.last)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await reg.close()
    run(go())


@pytest.mark.parametrize("api", APIS)
def test_watch_cursor_events_carry_values(etcd: EtcdServer, api: int) -> None:
    async def go() -> None:
        reg = open_api(f"v{api}", opts(etcd))
        try:
            snap = await reg.list_leases()
            await asyncio.to_thread(put, etcd, api, key("10.5.5.0/24"),
                                    encode_attrs(vx("10.10.1.5", 5)))
            batch = await reg.watch_leases(snap.cursor, 5.0)
            assert batch.cursor > snap.cursor
            assert batch.events[:1] == (WatchEvent(N("10.5.5.0/24"),
                                                   encode_attrs(vx("10.10.1.5", 5)),
                                                   batch.events[0].expiration),)
            empty = await reg.watch_leases(batch.cursor, 0.5)
            assert empty.events == () and empty.cursor == batch.cursor
        finally:
            await reg.close()
    run(go())


@pytest.mark.parametrize("api", APIS)
def test_hung_etcd_is_noticed_and_watch_resumes(etcd: EtcdServer, api: int) -> None:
    """SIGSTOP (a partition: no RST, just silence): a quiet watch must not pass for a
    healthy one. The watcher reports disconnected, keeps its peers, and resumes."""
    put(etcd, api, key("10.5.2.0/24"), encode_attrs(vx("10.10.1.2", 2)))

    async def go() -> None:
        reg = open_api(f"v{api}", EtcdOptions(endpoints=(etcd.endpoint,), prefix=PREFIX,
                                              timeout=2.0))
        seen = Seen()
        w = PeerWatcher(reg, backend_type=BackendType.VXLAN, own_subnet=lambda: None, on_peers=seen,
                        on_own_lease_lost=lambda: None, clock=time.monotonic,
                        watch_timeout=1.0)
        task = asyncio.ensure_future(w.run())
        try:
            await until(lambda: w.synced and w.connected)
            etcd.pause()
            try:
                await until(lambda: not w.connected, 20)
                assert seen.last == {N("10.5.2.0/24"): "10.10.1.2"}  # peers kept
            finally:
                etcd.resume()
            await until(lambda: w.connected, 30)
            await asyncio.to_thread(put, etcd, api, key("10.5.3.0/24"),
                                    encode_attrs(vx("10.10.1.3", 3)))
            await until(lambda: N("10.5.3.0/24") in seen.last, 20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await reg.close()
    run(go())


def test_etcd_fixture_serves_v2_and_v3(etcd: EtcdServer) -> None:
    etcd.etcdctl("set", "/k2", "v2value", api=2)
    etcd.etcdctl("put", "/k3", "v3value", api=3)
    assert etcd.etcdctl("get", "/k2", api=2).stdout.strip() == "v2value"
    assert "v3value" in etcd.etcdctl("get", "/k3", api=3).stdout
    assert etcd.etcdctl("get", "/k2", api=3).stdout.strip() == ""


def _config_watch_roundtrip(endpoint: str, server: EtcdServer, api: str) -> list[Any]:
    async def run() -> list[Any]:
        reg = open_api(api, EtcdOptions(endpoints=(endpoint,), prefix="/t"))
        assert isinstance(reg, ConfigWatch)
        n = int(api[1])
        seen: list[Any] = []
        try:
            text, cursor = await reg.get_config_rev()
            seen.append(text)
            idle = await reg.watch_config(cursor, 0.3)
            seen.append((idle.changed, idle.cursor == cursor))
            server.etcdctl("set" if n == 2 else "put", "/t/config", "A", api=n)
            server.etcdctl("rm" if n == 2 else "del", "/t/config", api=n)
            server.etcdctl("set" if n == 2 else "put", "/t/config", "B", api=n)
            for _ in range(3):
                ev = await reg.watch_config(cursor, 10)
                assert ev.changed and ev.cursor > cursor
                cursor = ev.cursor
                seen.append(ev.value)
            seen.append((await reg.get_config_rev())[0])
        finally:
            await reg.close()
        return seen
    return asyncio.run(run())


@pytest.mark.parametrize("api", ["v2", "v3"])
def test_config_watch_sees_set_delete_set_in_order(etcd: EtcdServer, api: str) -> None:
    seen = _config_watch_roundtrip(etcd.endpoint, etcd, api)
    assert seen == [None, (False, True), "A", None, "B", "B"]
