"""Holding a lease against the in-memory registry: races, restart, renewal, re-acquire."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random

from control.backoff import Backoff
from control.config import parse_config
from control.keeper import LeaseKeeper
from control.lease import LeaseAttrs, decode_attrs
from tests.fakes import FakeClock, InMemoryRegistry, run_async

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
SMALL = parse_config('{"Network":"10.5.0.0/24","SubnetLen":29,"Backend":{"Type":"vxlan"}}')


def keeper(reg: InMemoryRegistry, ip: str, seed: int = 0, **kw) -> LeaseKeeper:
    attrs = LeaseAttrs(A(ip), "vxlan", 1, bytes([2, 0, 0, 0, 1, seed % 256]))
    return LeaseKeeper(reg, SMALL, attrs, clock=reg.clock, sleep=reg.clock.sleep,
                       backoff=Backoff(rng=random.Random(seed)), rng=random.Random(seed), **kw)


@run_async
async def test_twenty_racing_nodes_get_distinct_subnets() -> None:
    reg = InMemoryRegistry(FakeClock())
    # Same rng seed everywhere: every node first picks the same subnet and most lose.
    keepers = [LeaseKeeper(reg, SMALL, LeaseAttrs(A(f"10.10.1.{i}"), "vxlan", 1,
                                                  bytes([2, 0, 0, 0, 1, i])),
                           clock=reg.clock, sleep=reg.clock.sleep, rng=random.Random(5))
               for i in range(1, 21)]
    leases = await asyncio.gather(*(k.acquire() for k in keepers))
    subnets = [le.subnet for le in leases]
    assert len(set(subnets)) == 20
    assert all(SMALL.contains_subnet(s) for s in subnets)
    assert reg.subnets() == set(subnets)


@run_async
async def test_restart_keeps_subnet_and_publishes_new_mac() -> None:
    reg = InMemoryRegistry(FakeClock())
    first = await keeper(reg, "10.10.1.1", seed=1).acquire()
    again = keeper(reg, "10.10.1.1", seed=2)
    second = await again.acquire()
    assert second.subnet == first.subnet
    stored = reg.value(first.subnet)
    assert stored is not None and decode_attrs(stored).vtep_mac == again.attrs.vtep_mac


@run_async
async def test_subnet_env_is_preferred() -> None:
    reg = InMemoryRegistry(FakeClock())
    k = keeper(reg, "10.10.1.1", preferred=lambda: [N("10.5.0.200/29")])
    assert (await k.acquire()).subnet == N("10.5.0.200/29")


@run_async
async def test_renewal_happens_before_expiry() -> None:
    reg = InMemoryRegistry(FakeClock())
    k = keeper(reg, "10.10.1.1", ttl=100, margin=30)
    lease = await k.acquire()
    first_expiry = k.expires_at
    assert first_expiry is not None
    task = asyncio.ensure_future(k.run())
    for _ in range(30):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert k.renewals >= 1 and k.expires_at is not None and k.expires_at > first_expiry
    assert reg.subnets() == {lease.subnet}  # never expired in between


@run_async
async def test_deleted_lease_is_reacquired_with_same_subnet() -> None:
    reg = InMemoryRegistry(FakeClock())
    k = keeper(reg, "10.10.1.1", ttl=1000, margin=100)
    lease = await k.acquire()
    task = asyncio.ensure_future(k.run())
    await asyncio.sleep(0)
    reg.remove(lease.subnet)
    k.lost()  # what the watch does when it sees the delete
    for _ in range(30):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert k.reacquisitions == 1
    assert reg.subnets() == {lease.subnet}


@run_async
async def test_lease_taken_by_another_node_is_detected_at_renewal() -> None:
    reg = InMemoryRegistry(FakeClock())
    k = keeper(reg, "10.10.1.1", ttl=100, margin=30)
    lease = await k.acquire()
    reg.remove(lease.subnet)
    reg.set(lease.subnet, '{"PublicIP":"10.10.1.99","BackendType":"host-gw"}', ttl=1000)
    task = asyncio.ensure_future(k.run())
    for _ in range(40):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert k.lease is not None and k.lease.subnet != lease.subnet
    assert k.reacquisitions == 1


@run_async
async def test_etcd_away_at_start_retries_with_backoff() -> None:
    reg = InMemoryRegistry(FakeClock(), away=True)
    k = keeper(reg, "10.10.1.1")
    task = asyncio.ensure_future(k.acquire())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done() and reg.calls >= 3
    reg.away = False
    lease = await asyncio.wait_for(task, 5)
    assert SMALL.contains_subnet(lease.subnet)
