"""control.follower: a live switch runs ConfigChange.steps in order, on the supervisor's
parts (fakes here), and a failed engine start keeps the running config."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from control.config import BackendType, NetworkConfig, parse_config
from control.follower import ConfigFollower
from control.lease import Lease, LeaseAttrs
from control.reconfig import Action
from control.supervisor import Supervisor
from tests.control_fakes import Recorder
from tests.fakes import FakeClock, InMemoryRegistry, run_async

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
OWN = N("10.7.1.0/24")
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
HOST_GW = '{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'


class FakeKeeper:
    def __init__(self, rec: Recorder, attrs: LeaseAttrs) -> None:
        self.rec, self.attrs, self.subnet = rec, attrs, OWN
        self.config: NetworkConfig | None = None

    async def republish(self, attrs: LeaseAttrs, config: NetworkConfig | None = None) -> None:
        self.config = config
        if attrs != self.attrs:
            self.attrs = attrs
            self.rec.events.append(("republish", str(attrs.backend_type)))


class FakeWatcher:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def set_backend_type(self, backend_type: BackendType) -> None:
        self.rec.events.append(("filter", str(backend_type)))


def kinds(rec: Recorder) -> list[str]:
    """The steps taken, without the peer hand-offs that follow each route sync."""
    return [e[0] for e in rec.events if e[0] != "engine peers"]


async def world(rec: Recorder, tmp_path: Path, text: str
                ) -> tuple[ConfigFollower, Supervisor, FakeKeeper]:
    dp = Supervisor(parse_config(text), 1450 if "vxlan" in text else 1500, A("10.10.1.1"),
                    subnet_file=str(tmp_path / "subnet.env"), engine_starter=rec.start_engine,
                    routes_factory=rec.new_routes, masq_installer=rec.install_masq)
    lease = Lease(OWN, dp.lease_attrs())
    dp.lease_acquired(lease)
    await dp.start(lease)
    keeper = FakeKeeper(rec, dp.lease_attrs())
    follower = ConfigFollower(InMemoryRegistry(FakeClock()), dp,
                              keeper, FakeWatcher(rec),  # type: ignore[arg-type]
                              key="/coreos.com/network/config", iface_mtu=1500)
    rec.events.clear()
    return follower, dp, keeper


@run_async
async def test_host_gw_to_vxlan_engine_first_lease_last(tmp_path: Path) -> None:
    rec = Recorder()
    follower, dp, keeper = await world(rec, tmp_path, HOST_GW)
    change = await follower.apply(VXLAN)
    assert change.action is Action.APPLY
    assert kinds(rec) == ["engine start", "filter", "sync", "republish"]
    assert ("sync", ("vxlan", "flannel.1", OWN)) in rec.events  # into the new TUN
    assert dp.config == parse_config(VXLAN) and dp.mtu == 1450 and dp.vtep_mac is not None
    assert keeper.config == parse_config(VXLAN) and keeper.attrs.vtep_mac == dp.vtep_mac
    assert "FLANNEL_MTU=1450" in (tmp_path / "subnet.env").read_text()


@run_async
async def test_vxlan_to_host_gw_engine_stops_after_the_routes(tmp_path: Path) -> None:
    rec = Recorder()
    follower, dp, _ = await world(rec, tmp_path, VXLAN)
    await follower.apply(HOST_GW)
    assert kinds(rec) == ["filter", "sync", "engine close", "republish"]
    assert ("sync", ("host-gw", "flannel.1", OWN)) in rec.events  # still the old TUN
    assert dp.engine is None and dp.routes is not None and dp.routes.device is None
    assert "FLANNEL_MTU=1500" in (tmp_path / "subnet.env").read_text()


@run_async
async def test_failed_engine_restart_keeps_the_running_config_and_engine(
        tmp_path: Path) -> None:
    rec = Recorder()
    follower, dp, keeper = await world(rec, tmp_path, VXLAN)
    rec.fail_engine_start = True
    await follower.apply('{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan","VNI":2}}')
    assert dp.config == parse_config(VXLAN)  # TAKE_CONFIG never ran
    assert kinds(rec) == ["engine close", "engine start", "sync"]  # the old engine again
    assert dp.engine is rec.engines[-1] and rec.engines[-1].config.vni == 1
    assert keeper.config is None  # nothing told the keeper


@run_async
async def test_rejected_and_deleted_values_change_nothing(tmp_path: Path) -> None:
    rec = Recorder()
    follower, dp, _ = await world(rec, tmp_path, VXLAN)
    for text in (None, "not json", '{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan"}}',
                 VXLAN):
        await follower.apply(text)
    assert rec.events == [] and dp.config == parse_config(VXLAN)
