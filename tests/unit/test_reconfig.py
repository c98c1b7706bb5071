"""control.reconfig: the verdict on a new network config for a running node."""

from __future__ import annotations

import ipaddress

import pytest

from control.config import parse_config
from control.reconfig import Action, EngineStep, Step, backend_label, plan_change

OWN = ipaddress.IPv4Network("10.7.1.0/24")
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
VXLAN_DR = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'
HOST_GW = '{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'


def change(old: str, new: str | None, own: ipaddress.IPv4Network | None = OWN,
           mtu: int = 1500):
    return plan_change(parse_config(old), new, own_subnet=own, iface_mtu=mtu,
                       key="/coreos.com/network/config")


@pytest.mark.parametrize("old,new,engine,republish,label,mtu", [
    (VXLAN, VXLAN_DR, EngineStep.KEEP, False, "vxlan + DirectRouting", 1450),
    (VXLAN_DR, HOST_GW, EngineStep.STOP, True, "host-gw", 1500),
    (HOST_GW, VXLAN, EngineStep.START, True, "vxlan", 1450),
    (VXLAN_DR, VXLAN, EngineStep.KEEP, False, "vxlan", 1450),
])
def test_backend_switches_in_place(old: str, new: str, engine: EngineStep, republish: bool,
                                   label: str, mtu: int) -> None:
    c = change(old, new)
    assert c.action is Action.APPLY and c.switches_backend
    assert c.engine is engine and c.republish_lease is republish and c.mtu == mtu
    assert backend_label(c.config.backend) == label
    assert c.config == parse_config(new)
    assert f"-> {label} in place" in c.message and "/coreos.com/network/config" in c.message


def test_seed_casing_is_the_same_config() -> None:
    c = change(VXLAN_DR, '{"network":"10.7.0.0/16","backend":{"type":"vxlan",'
                         '"DirectRouting":true}}')
    assert c.action is Action.NONE and c.config == parse_config(VXLAN_DR)


def test_same_text_again_changes_nothing() -> None:
    assert change(VXLAN, VXLAN).action is Action.NONE


@pytest.mark.parametrize("options,changed", [
    ('"VNI":2', "VNI 1 -> 2"), ('"Port":4789', "Port 8472 -> 4789"),
    ('"MTU":1400', "MTU None -> 1400"),
])
def test_engine_options_restart_the_engine(options: str, changed: str) -> None:
    c = change(VXLAN, '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan",' + options + "}}")
    assert c.action is Action.APPLY and c.engine is EngineStep.RESTART
    assert c.changes == (changed,)
    assert c.republish_lease is (changed.startswith("VNI"))


def test_bad_config_keeps_the_old_one_with_flannels_message() -> None:
    old = parse_config(VXLAN)
    c = change(VXLAN, '{"Network":"10.7.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}')
    assert c.action is Action.REJECT and c.config == old
    assert "SubnetLen must be less than /31" in c.message
    assert "keeping the running one" in c.message and "backend vxlan" in c.message
    for text in ("not json", '{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}',
                 '{"Network":"10.7.0.0/16","Backend":{"Type":"ipip"}}', "[]"):
        c = change(VXLAN, text)
        assert c.action is Action.REJECT and c.config == old, text
        assert c.message.count("\n") == 0


def test_deleted_key_keeps_the_running_config() -> None:
    c = change(VXLAN_DR, None)
    assert c.action is Action.DELETED and c.config == parse_config(VXLAN_DR)
    assert "deleted" in c.message and "vxlan + DirectRouting" in c.message


def test_network_change_is_refused_naming_the_lease() -> None:
    c = change(VXLAN, '{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan"}}')
    assert c.action is Action.REJECT and c.config == parse_config(VXLAN)
    assert "Network 10.7.0.0/16 -> 10.8.0.0/16" in c.message
    assert "our lease 10.7.1.0/24 does not fit" in c.message and "restart" in c.message


def test_network_change_that_still_holds_the_lease_is_refused_too() -> None:
    c = change(VXLAN, '{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}')
    assert c.action is Action.REJECT and "Network 10.7.0.0/16 -> 10.0.0.0/8" in c.message
    assert "does not fit" not in c.message and "cannot be applied while running" in c.message


def test_subnet_len_change_is_refused() -> None:
    c = change(VXLAN, '{"Network":"10.7.0.0/16","SubnetLen":25,"Backend":{"Type":"vxlan"}}')
    assert c.action is Action.REJECT and "SubnetLen /24 -> /25" in c.message


def test_subnet_range_change_applies_if_the_lease_still_fits() -> None:
    c = change(VXLAN, '{"Network":"10.7.0.0/16","SubnetMax":"10.7.100.0",'
                      '"Backend":{"Type":"vxlan"}}')
    assert c.action is Action.APPLY and c.engine is EngineStep.KEEP
    assert not c.switches_backend and c.changes == ("SubnetMax 10.7.255.0 -> 10.7.100.0",)
    c = change(VXLAN, '{"Network":"10.7.0.0/16","SubnetMin":"10.7.5.0",'
                      '"Backend":{"Type":"vxlan"}}')
    assert c.action is Action.REJECT and "outside SubnetMin 10.7.5.0" in c.message


def test_without_a_lease_network_changes_are_still_refused() -> None:
    c = change(VXLAN, '{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan"}}', own=None)
    assert c.action is Action.REJECT


S = Step


@pytest.mark.parametrize("old,new,steps", [
    # host-gw -> vxlan: the TUN exists before a route points into it; the lease last.
    (HOST_GW, VXLAN, (S.START_ENGINE, S.TAKE_CONFIG, S.WRITE_SUBNET_ENV, S.FILTER_PEERS,
                      S.PROGRAM_ROUTES, S.REPUBLISH_LEASE)),
    # vxlan -> host-gw: the engine stops only once no route points into it.
    (VXLAN_DR, HOST_GW, (S.TAKE_CONFIG, S.WRITE_SUBNET_ENV, S.FILTER_PEERS, S.PROGRAM_ROUTES,
                         S.STOP_ENGINE, S.REPUBLISH_LEASE)),
    # DirectRouting on/off: paths only; the lease value (BackendType, VNI) is the same.
    (VXLAN, VXLAN_DR, (S.TAKE_CONFIG, S.PROGRAM_ROUTES)),
    # A new VNI: the old engine frees the UDP port first; the lease says the new VNI.
    (VXLAN, '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan","VNI":2}}',
     (S.STOP_ENGINE, S.START_ENGINE, S.TAKE_CONFIG, S.PROGRAM_ROUTES, S.REPUBLISH_LEASE)),
    (VXLAN, '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}',
     (S.STOP_ENGINE, S.START_ENGINE, S.TAKE_CONFIG, S.WRITE_SUBNET_ENV, S.PROGRAM_ROUTES)),
    # Only the allocation range: nothing on this node changes but the config it keeps.
    (VXLAN, '{"Network":"10.7.0.0/16","SubnetMax":"10.7.200.0","Backend":{"Type":"vxlan"}}',
     (S.TAKE_CONFIG,)),
])
def test_applied_changes_carry_their_ordered_steps(old: str, new: str,
                                                   steps: tuple[Step, ...]) -> None:
    c = change(old, new)
    assert c.action is Action.APPLY
    assert c.steps == steps
    assert (S.REPUBLISH_LEASE in c.steps) is c.republish_lease


def test_changes_not_applied_have_no_steps() -> None:
    for new in (VXLAN, None, "not json",
                '{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan"}}'):
        assert change(VXLAN, new).steps == ()
