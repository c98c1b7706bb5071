"""explain's decision path (pure): every verdict, the rx checks in the engine's order."""

from __future__ import annotations

import ipaddress

import pytest

from control.explain import NodeView, Probe, explain, lookups_needed
from control.reconcile import RouteLookup
from dataplane.fib import Path, Peer

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
MAC2 = bytes.fromhex("0a0000000002")
MAC3 = bytes.fromhex("0a0000000003")
H2 = Peer(NET("10.7.2.0/24"), ADDR("10.10.1.2"), MAC2, Path.DIRECT)
H3 = Peer(NET("10.7.3.0/24"), ADDR("10.10.2.1"), MAC3, Path.VXLAN, partial_csum=True)
H4 = Peer(NET("10.7.4.0/24"), ADDR("10.10.2.2"), None, Path.UNREACHABLE)
NODE = NodeView(subnet=NET("10.7.1.0/24"), public_ip=ADDR("10.10.1.1"), vtep_mac=OWN_MAC,
                network=NET("10.7.0.0/16"), direct_routing=True, peers=(H2, H3, H4),
                lease_expiry={H3.subnet: 1000.0 + 7200}, tun="flannel.1")
NOW = 1000.0
TUN = (RouteLookup(None, "flannel.1"),)
ETH0 = (RouteLookup(None, "eth0"),)
DEFAULT = (RouteLookup(ADDR("10.10.1.254"), "eth0"),)
KERNEL = {
    ADDR("10.7.2.5"): (RouteLookup(ADDR("10.10.1.2"), "eth0"),),
    ADDR("10.7.3.5"): TUN, ADDR("10.7.9.5"): TUN, ADDR("10.7.4.5"): DEFAULT,
    ADDR("10.10.2.1"): DEFAULT, ADDR("10.99.0.1"): DEFAULT, ADDR("10.7.1.5"): ETH0,
    ADDR("10.10.1.1"): (RouteLookup(None, "lo", local=True),),
}


def tx(dst: str, src: str = "10.7.1.5", **kw: object) -> tuple[str, str | None, str | None]:
    ex = explain(NODE, Probe(ADDR(src), ADDR(dst), **kw), KERNEL, NOW)  # type: ignore[arg-type]
    return ex.verdict, ex.reason, str(ex.peer.subnet) if ex.peer else None


def rx(outer: str, src: str = "10.7.3.5", dst: str = "10.7.1.5", node: NodeView = NODE,
       **kw: object) -> tuple[str, str | None]:
    ex = explain(node, Probe(ADDR(src), ADDR(dst), outer_src=ADDR(outer), **kw),  # type: ignore[arg-type]
                 KERNEL, NOW)
    assert ex.direction == "rx"
    return ex.verdict, ex.reason


def test_tx_verdicts_for_a_directrouting_node() -> None:
    assert tx("10.7.2.5") == ("direct", None, "10.7.2.0/24")
    assert tx("10.7.3.5") == ("vxlan", None, "10.7.3.0/24")
    assert tx("10.7.9.5") == ("no-route", "no_route", None)
    assert tx("10.7.1.9") == ("local", None, None)
    assert tx("10.10.1.1") == ("local", None, None)
    verdict, reason, peer = tx("10.7.4.5")
    assert (verdict, peer) == ("no-route", "10.7.4.0/24") and "not on our L2" in str(reason)
    verdict, reason, _ = tx("10.99.0.1")
    assert verdict == "no-route" and "outside the flannel network" in str(reason)
    verdict, reason, _ = tx("10.7.200.1")  # not looked up: the kernel had no answer
    assert verdict == "no-route" and "no route" in str(reason)


def test_vxlan_steps_name_the_lease_and_outer_headers() -> None:
    ex = explain(NODE, Probe(ADDR("10.7.1.5"), ADDR("10.7.3.5"), proto="tcp", dport=80,
                             size=1400), KERNEL, NOW)
    doc = ex.to_json(NODE, NOW)
    assert doc["verdict"] == "vxlan"
    assert doc["peer"] == {"subnet": "10.7.3.0/24", "public_ip": "10.10.2.1",
                           "vtep_mac": "0a:00:00:00:00:03", "path": "vxlan",
                           "flannelette": True, "lease_expires_at": 8200.0,
                           "lease_expires_in_s": 7200.0}
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["kernel route"]["dev"] == "flannel.1"
    outer = steps["outer headers"]
    assert (outer["outer_src"], outer["outer_dst"], outer["vni"], outer["inner_dst_mac"]) == (
        "10.10.1.1", "10.10.2.1", 1, "0a:00:00:00:00:03")
    assert "1450 bytes on the wire" in outer["detail"]
    assert "left partial" in steps["checksum"]["detail"]
    assert "lease expires in 2.00 h" in steps["fib"]["detail"]
    assert "via 10.10.1.254 dev eth0" in steps["outer route"]["detail"]


def test_tx_from_outside_our_subnet_is_dropped_by_a_flannelette_peer() -> None:
    assert tx("10.7.3.5", src="10.7.2.9") == ("dropped", "spoofed_inner_source", "10.7.3.0/24")


def test_tx_above_the_mtu_says_the_kernel_fragments_it() -> None:
    ex = explain(NODE, Probe(ADDR("10.7.1.5"), ADDR("10.7.3.5"), size=1500), KERNEL, NOW)
    assert any(s["step"] == "mtu" and "MTU 1450" in s["detail"] for s in ex.steps)


def test_missing_direct_route_is_named() -> None:
    kernel = dict(KERNEL)
    kernel[ADDR("10.7.2.5")] = DEFAULT
    ex = explain(NODE, Probe(ADDR("10.7.1.5"), ADDR("10.7.2.5")), kernel, NOW)
    assert ex.verdict == "no-route" and "direct route for 10.7.2.0/24" in str(ex.reason)


def test_rx_checks_in_the_engine_order() -> None:
    assert rx("10.10.2.1") == ("vxlan", None)
    assert rx("10.10.9.9") == ("dropped", "unknown_peer")
    assert rx("10.10.1.2", src="10.7.2.5") == ("dropped", "unknown_peer")  # a direct peer
    assert rx("10.10.2.1", vni=2) == ("dropped", "wrong_vni")
    assert rx("10.10.2.1", inner_dst_mac=MAC2) == ("dropped", "not_for_our_mac")
    assert rx("10.10.2.1", size=1451, proto="udp") == ("dropped", "oversize")
    assert rx("10.10.2.1", size=1451, proto="tcp") == ("vxlan", None)
    assert rx("10.10.2.1", src="10.7.1.7") == ("dropped", "spoofed_inner_source")
    off = NodeView(**{**NODE.__dict__, "check_inner_source": False})
    assert rx("10.10.2.1", src="10.7.1.7", node=off) == ("vxlan", None)
    # the first failing check decides: an unknown sender with a wrong VNI is unknown_peer
    assert rx("10.10.9.9", vni=2) == ("dropped", "unknown_peer")


def test_rx_without_an_engine_is_dropped() -> None:
    hostgw = NodeView(subnet=NODE.subnet, public_ip=NODE.public_ip, backend="host-gw",
                      peers=(H2,))
    assert rx("10.10.1.2", node=hostgw) == ("dropped", "no_engine")
    ex = explain(hostgw, Probe(ADDR("10.7.1.5"), ADDR("10.7.2.5")), KERNEL, NOW)
    assert ex.verdict == "direct"


def test_lookups_needed_and_probe_validation() -> None:
    assert lookups_needed(NODE, Probe(ADDR("10.7.1.5"), ADDR("10.7.3.5"))) == [
        ADDR("10.7.3.5"), ADDR("10.10.2.1")]
    assert lookups_needed(NODE, Probe(ADDR("10.7.3.5"), ADDR("10.7.1.5"),
                                      outer_src=ADDR("10.10.2.1"))) == [ADDR("10.7.1.5")]
    with pytest.raises(ValueError, match="proto"):
        Probe(ADDR("10.0.0.1"), ADDR("10.0.0.2"), proto="sctp")
    with pytest.raises(ValueError, match="dport"):
        Probe(ADDR("10.0.0.1"), ADDR("10.0.0.2"), dport=70000)
