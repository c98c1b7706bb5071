"""explain names the outer source port the engine really uses for a flow (its lane)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet

from control.explain import NodeView, Probe, explain
from control.reconcile import RouteLookup
from dataplane.engine import Engine, EngineConfig
from dataplane.fib import Path, Peer
from tests.devices import FakeTun, FakeUdp

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
PEER = Peer(NET("10.7.3.0/24"), ADDR("10.10.2.1"), bytes.fromhex("0a0000000003"), Path.VXLAN)
LOOKUPS = {ADDR("10.7.3.5"): (RouteLookup(None, "flannel.1"),),
           ADDR("10.10.2.1"): (RouteLookup(ADDR("10.10.1.254"), "eth0"),)}
NODE = NodeView(subnet=NET("10.7.1.0/24"), public_ip=ADDR("10.10.1.1"), vtep_mac=OWN_MAC,
                network=NET("10.7.0.0/16"), peers=(PEER,), tun="flannel.1",
                source_ports=(40001, 40002, 40003, 40004))


def engine_sport(packet: Packet) -> int:
    """The source port the engine (four lanes, ports 40001..40004) sends ``packet`` from."""
    tun, udp = FakeTun(), FakeUdp(lanes=4)
    e = Engine(EngineConfig(NET("10.7.1.0/24"), ADDR("10.10.1.1"), OWN_MAC, mtu=1450), tun, udp)
    asyncio.run(e.start())
    e.set_peers([dataclasses.replace(PEER, path=Path.VXLAN)])
    tun.queue_packet(bytes(packet))
    e.tun_readable()
    (sent,) = udp.sent
    return sent.sport


def outer_step(probe: Probe, node: NodeView = NODE) -> dict[str, object]:
    ex = explain(node, probe, LOOKUPS, 0.0)
    assert ex.verdict == "vxlan"
    return next(s for s in ex.steps if s["step"] == "outer headers")


def test_the_port_explain_names_is_the_one_the_engine_sends_from() -> None:
    src, dst = ADDR("10.7.1.5"), ADDR("10.7.3.5")
    for sport in (33000, 41234, 50505, 60001):
        step = outer_step(Probe(src, dst, proto="tcp", sport=sport, dport=443))
        real = engine_sport(IP(src=str(src), dst=str(dst)) / TCP(sport=sport, dport=443))
        assert step["udp_sport"] == real
        assert f"UDP {real} (the flow's source lane) > 8472" in str(step["detail"])
    step = outer_step(Probe(src, dst, proto="udp", sport=5353, dport=53))
    assert step["udp_sport"] == engine_sport(
        IP(src=str(src), dst=str(dst)) / UDP(sport=5353, dport=53) / b"q")
    step = outer_step(Probe(src, dst))  # ICMP: addresses and protocol alone pick the lane
    assert step["udp_sport"] == engine_sport(IP(src=str(src), dst=str(dst)) / ICMP())


def test_unknown_ports_or_lanes_are_said_so() -> None:
    src, dst = ADDR("10.7.1.5"), ADDR("10.7.3.5")
    step = outer_step(Probe(src, dst, proto="tcp", dport=443))
    assert step["udp_sport"] is None
    assert "one of 40001, 40002, 40003, 40004, by the flow hash" in str(step["detail"])
    pool = dataclasses.replace(NODE, source_ports=None)
    assert "worker's lane" in str(outer_step(Probe(src, dst), pool)["detail"])
    plain = dataclasses.replace(NODE, source_ports=())
    step = outer_step(Probe(src, dst, proto="tcp", sport=1, dport=2), plain)
    assert step["udp_sport"] == 8472 and "UDP 8472 > 8472" in str(step["detail"])
