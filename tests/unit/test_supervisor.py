"""control.supervisor with fake engine/routes/masquerade: one writer of the peer set, and a
re-acquired different subnet gives a new dataplane whose masquerade rules name it."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

from control import subnetenv
from control.config import BackendType, parse_config
from control.lease import Lease, LeaseAttrs
from control.supervisor import Supervisor
from tests.control_fakes import Recorder
from tests.fakes import run_async

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
VXLAN = parse_config('{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}')
OLD, NEW = N("10.7.1.0/24"), N("10.7.9.0/24")
MAC = bytes([2, 0, 0, 0, 0, 2])


def lease(subnet: ipaddress.IPv4Network, ip: str = "10.10.1.1") -> Lease:
    return Lease(subnet, LeaseAttrs(A(ip), BackendType.VXLAN, 1, MAC))


def make(rec: Recorder, tmp_path: Path, *, ip_masq: bool = False) -> Supervisor:
    return Supervisor(VXLAN, 1450, A("10.10.1.1"), subnet_file=str(tmp_path / "subnet.env"),
                      ip_masq=ip_masq, engine_starter=rec.start_engine,
                      routes_factory=rec.new_routes, masq_installer=rec.install_masq)


async def settle(n: int = 12) -> None:
    """Long enough for the supervisor's debounce (0.1 s quiet) and one round."""
    for _ in range(n):
        await asyncio.sleep(0.05)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_lease_attrs_follow_the_backend(tmp_path: Path) -> None:
    dp = make(Recorder(), tmp_path)
    attrs = dp.lease_attrs()
    assert attrs.backend_type is BackendType.VXLAN and attrs.vtep_mac == dp.vtep_mac
    assert attrs.vni == 1 and attrs.csum_partial
    dp.take_config(parse_config('{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'), 1500)
    attrs = dp.lease_attrs()
    assert attrs.backend_type == "host-gw" and attrs.vtep_mac is None and attrs.vni is None


@run_async
async def test_peers_reach_the_engine_only_through_the_route_step(tmp_path: Path) -> None:
    rec = Recorder()
    dp = make(rec, tmp_path)
    dp.lease_acquired(lease(OLD))
    await dp.start(lease(OLD))
    task = asyncio.ensure_future(dp.run())
    try:
        dp.offer_peers({N("10.7.2.0/24"): lease(N("10.7.2.0/24"), "10.10.1.2")})
        await settle()
        engine = rec.engines[-1]
        assert [str(p.subnet) for p in engine.peers] == ["10.7.2.0/24"]
        assert dp.peers == engine.peers and dp.state().up
        assert ("sync", ("vxlan", "flannel.1", OLD)) in rec.events
        assert [str(d.peer.subnet) for d in dp.state().decisions] == ["10.7.2.0/24"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dp.close()
    assert rec.engines[-1].closed


@run_async
async def test_a_different_subnet_gets_a_new_dataplane_and_new_masq_rules(
        tmp_path: Path) -> None:
    rec = Recorder()
    dp = make(rec, tmp_path, ip_masq=True)
    dp.lease_acquired(lease(OLD))
    await dp.start(lease(OLD))
    assert ("masq", OLD) in rec.events
    task = asyncio.ensure_future(dp.run())
    try:
        await settle(2)
        old_routes = rec.routes[-1]
        rec.events.clear()
        dp.lease_acquired(lease(NEW))  # the keeper re-acquired: another subnet
        env = subnetenv.parse((tmp_path / "subnet.env").read_text())
        assert env["FLANNEL_SUBNET"] == "10.7.9.1/24" and env["FLANNEL_IPMASQ"] == "true"
        await settle()
        assert rec.events[:4] == [("engine close", OLD), ("engine start", NEW),
                                  ("routes", NEW), ("masq", NEW)]
        assert dp.lease is not None and dp.lease.subnet == NEW
        assert rec.engines[-1].config.subnet == NEW and rec.routes[-1].own_subnet == NEW
        assert dp.state().up
        # The old programmer's monitor is stopped; a late re-evaluation is ignored.
        assert old_routes.on_peers is not None
        old_routes.on_peers(())
        dp.offer_peers({N("10.7.3.0/24"): lease(N("10.7.3.0/24"), "10.10.1.3")})
        await settle()
        old_routes.on_peers(())
        assert [str(p.subnet) for p in rec.engines[-1].peers] == ["10.7.3.0/24"]
        # The same subnet again (a renewal-style re-acquire): nothing restarts.
        rec.events.clear()
        dp.lease_acquired(lease(NEW))
        await settle()
        assert not any(e[0] in ("engine start", "masq", "routes") for e in rec.events)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dp.close()


@run_async
async def test_a_failed_move_is_retried(tmp_path: Path) -> None:
    rec = Recorder()
    dp = make(rec, tmp_path)
    dp.lease_acquired(lease(OLD))
    await dp.start(lease(OLD))
    task = asyncio.ensure_future(dp.run())
    try:
        rec.fail_engine_start = True
        dp.lease_acquired(lease(NEW))
        # The first attempt fails; the retry (0.25-0.5 s later) works.
        await until(lambda: rec.engines[-1].config.subnet == NEW and dp.state().up)
        assert dp.engine is rec.engines[-1]
        assert dp.state().up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await dp.close()
