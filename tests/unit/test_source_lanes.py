"""Source lanes: each inner flow leaves from one outer source port, flows spread over lanes.

Pure logic (``wire.flow_lane``) and the engine's tx loop on fake devices, plus the
real endpoint's lane sockets on 127.0.0.1 (no root needed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from control.errors import FlagError
from control.options import parse_args
from dataplane import vnet, wire
from dataplane.csum import pseudo_header_sum
from dataplane.engine import Engine, EngineConfig
from dataplane.errors import ConfigError
from dataplane.fib import Peer
from dataplane.tap import TapFilter, TapSubscriber
from dataplane.udp import UdpEndpoint
from tests.devices import FakeTun, FakeTunnel, FakeUdp

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
PEER_MAC = bytes.fromhex("0a0000000002")
PEER = Peer(NET("10.244.2.0/24"), ADDR("10.10.1.2"), PEER_MAC)
MTU = 1450


def engine(lanes: int, *, offload: bool = False) -> tuple[Engine, FakeTun, FakeUdp]:
    tun, udp = FakeTun(offload=offload), FakeUdp(lanes=lanes)
    e = Engine(EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC, mtu=MTU,
                            offload=offload), tun, udp)
    asyncio.run(e.start())
    e.set_peers([PEER])
    return e, tun, udp


def tcp(sport: int, payload: int = 1398, seq: int = 1, flags: str = "A") -> bytes:
    return bytes(IP(src="10.244.1.2", dst="10.244.2.2") / TCP(sport=sport, dport=80, seq=seq,
                                                              flags=flags) / (b"d" * payload))


def queue_super_packet(tun: FakeTun, sport: int, payload: int) -> bytes:
    """Queue a TSO super-packet (MSS 1000, the TCP checksum partial, as the TUN hands it)."""
    big = bytearray(tcp(sport, payload=payload, flags="PA"))
    struct.pack_into("!H", big, 36, pseudo_header_sum(big, 0, 6, len(big) - 20))
    tun.queue_packet(bytes(big), vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 1000, 20,
                                              16).pack())
    return bytes(big)


def inner_of(datagram: bytes) -> IP:
    inner: IP = Ether(datagram[8:])[IP]
    return inner


# ---- the pure hash -------------------------------------------------------------------------
@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 64),
       st.sampled_from([6, 17]), st.integers(0, 10))
def test_flow_lane_is_one_plus_the_flow_hash_modulo_lanes(sport: int, dport: int, lanes: int,
                                                         proto: int, opt_words: int) -> None:
    l4 = TCP(sport=sport, dport=dport) if proto == 6 else UDP(sport=sport, dport=dport)
    pkt = bytes(IP(src="10.244.1.9", dst="10.244.7.1",
                   options=[b"\x01" * 4 * opt_words] if opt_words else []) / l4 / b"x")
    assert wire.flow_lane(pkt, 0, lanes) == 1 + wire.flow_hash(pkt) % lanes
    assert wire.flow_lane(b"\0" * 22 + pkt, 22, lanes) == wire.flow_lane(pkt, 0, lanes)


def test_flow_lane_ignores_ports_of_fragments_and_of_other_protocols() -> None:
    frag0 = bytes(IP(src="10.244.1.2", dst="10.244.2.2", flags="MF") / UDP(sport=1) / (b"x" * 40))
    frag1 = bytes(IP(src="10.244.1.2", dst="10.244.2.2", frag=3, proto=17) / (b"y" * 24))
    assert wire.flow_lane(frag0, 0, 16) == wire.flow_lane(frag1, 0, 16)
    pings = {wire.flow_lane(bytes(IP(src="10.244.1.2", dst="10.244.2.2") / ICMP(id=i, seq=i)),
                            0, 16) for i in range(50)}
    assert len(pings) == 1  # one ping flow, one lane, whatever its id and checksum


def test_flows_spread_over_the_lanes() -> None:
    lanes = {wire.flow_lane(tcp(sport), 0, 8) for sport in range(40000, 40064)}
    assert len(lanes) >= 6 and lanes <= set(range(1, 9))


# ---- the engine ----------------------------------------------------------------------------
def test_each_flow_leaves_from_its_lane_and_runs_split_where_the_lane_changes() -> None:
    e, tun, udp = engine(lanes=4)
    flows = [41000 + k for k in range(12)]
    for round_ in range(3):  # interleaved: every packet starts a new run
        for sport in flows:
            tun.queue_packet(tcp(sport, seq=1 + round_ * 1398))
    for _ in range(5):  # then one flow back to back: one GSO call
        tun.queue_packet(tcp(flows[0]))
    e.tun_readable()
    assert len(udp.sent) == 3 * 12 + 5
    by_flow: dict[int, set[int]] = {}
    for s in udp.sent:
        pkt = inner_of(s.data)
        by_flow.setdefault(pkt[TCP].sport, set()).add(s.sport)
        assert s.addr == ("10.10.1.2", 8472)
    for sport, ports in by_flow.items():
        assert ports == {40000 + wire.flow_lane(tcp(sport), 0, 4)}  # one port per flow
    assert len(set().union(*by_flow.values())) >= 3  # and flows spread over lanes
    tail = udp.sent[-5:]
    assert len({s.gso_call for s in tail}) == 1 and tail[0].gso_call > 0


def test_udp_options_and_fragments_take_the_lane_flow_lane_gives() -> None:
    """The tx loop's inlined hash (TCP/UDP, 20-byte header) and the general one agree."""
    e, tun, udp = engine(lanes=5)
    pkts = [bytes(IP(src="10.244.1.2", dst="10.244.2.2") / UDP(sport=6000 + k, dport=53)
                  / (b"q" * 30)) for k in range(8)]
    pkts += [bytes(IP(src="10.244.1.2", dst="10.244.2.2", options=[b"\x01" * 4])
                   / TCP(sport=7000 + k, dport=80)) for k in range(4)]
    pkts += [bytes(IP(src="10.244.1.2", dst="10.244.2.2", flags="MF", proto=17) / (b"f" * 64)),
             bytes(IP(src="10.244.1.2", dst="10.244.2.2") / ICMP())]
    for p in pkts:
        tun.queue_packet(p)
    e.tun_readable()
    assert len(udp.sent) == len(pkts)
    for p, s in zip(pkts, udp.sent, strict=True):
        assert s.sport == 40000 + wire.flow_lane(p, 0, 5)
    assert len({s.sport for s in udp.sent[:8]}) >= 3


def test_a_flow_keeps_its_port_on_the_tunnel_gso_path_and_the_socket_path() -> None:
    """A flow's super-packets (to the TAP) and its small packets (to a lane socket) share
    one source port, so a receiver spreading by 4-tuple keeps the flow on one queue."""
    e, tun, udp = engine(lanes=8, offload=True)
    tap = FakeTunnel()
    e.attach_tunnel(tap)
    big = queue_super_packet(tun, 43210, 6000)
    tun.queue_packet(tcp(43210, payload=0))  # its pure ACK: not GSO
    e.tun_readable()
    (head, inner), = tap.written
    outer = Ether(head[24:] + inner)
    (ack,) = udp.sent
    assert outer[UDP].sport == ack.sport == 40000 + wire.flow_lane(big, 0, 8)
    assert outer[VXLAN].vni == 1


def test_the_userspace_split_sends_from_the_flow_lane() -> None:
    e, tun, udp = engine(lanes=3, offload=True)
    big = queue_super_packet(tun, 43999, 5000)
    e.tun_readable()
    assert len(udp.sent) == 5
    assert {s.sport for s in udp.sent} == {40000 + wire.flow_lane(big, 0, 3)}


def test_without_lanes_everything_leaves_from_the_vxlan_port() -> None:
    e, tun, udp = engine(lanes=0, offload=True)
    tap = FakeTunnel()
    e.attach_tunnel(tap)
    queue_super_packet(tun, 43210, 6000)
    for sport in range(5):
        tun.queue_packet(tcp(44000 + sport))
    e.tun_readable()
    (head, inner), = tap.written
    assert Ether(head[24:] + inner)[UDP].sport == 8472
    assert {s.sport for s in udp.sent} == {8472}


def test_tap_records_carry_the_outer_source_ports() -> None:
    e, tun, udp = engine(lanes=4)
    sub = TapSubscriber(TapFilter())
    e.add_tap(sub)
    tun.queue_packet(tcp(45000))
    e.tun_readable()
    frame = wire.build_frame(1, OWN_MAC, PEER_MAC, bytes(
        IP(src="10.244.2.2", dst="10.244.1.2") / TCP(sport=80, dport=45000, flags="A")))
    udp.queue(frame, "10.10.1.2", port=51234)
    e.udp_readable()
    tx, rx = sub.drain()
    assert (tx.direction, tx.outer_sport) == ("tx", 40000 + wire.flow_lane(tcp(45000), 0, 4))
    assert (rx.direction, rx.outer_sport, rx.outer_dport) == ("rx", 51234, 8472)


# ---- the real endpoint's lane sockets -------------------------------------------------------
def test_lane_sockets_send_from_their_own_ports_and_queue_nothing() -> None:
    recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    recv.bind(("127.0.0.1", 0))
    recv.settimeout(5)
    ep = UdpEndpoint.open("127.0.0.1", 0, 1 << 16, gro=False, source_ports=3)
    try:
        assert ep.lanes == 4
        assert len(set(ep.ports[1:])) == 3 and all(p > 0 for p in ep.ports[1:])
        dst = recv.getsockname()
        for lane in range(1, 4):
            assert ep.send(b"lane %d" % lane, dst, lane)
            data, (_, sport) = recv.recvfrom(100)
            assert (data, sport) == (b"lane %d" % lane, ep.ports[lane])
        sent = ep.send_run(memoryview(b"a" * 300), 100, dst, 2)  # GSO or one per datagram
        assert sent == (3, 300)
        for _ in range(3):
            data, (_, sport) = recv.recvfrom(200)
            assert (len(data), sport) == (100, ep.ports[2])
        # Whatever is sent to a lane's port is dropped by its filter, never queued.
        for lane_port in ep.ports[1:]:
            recv.sendto(b"stray", ("127.0.0.1", lane_port))
        for sock in ep._lane_socks:
            sock.setblocking(False)
            try:
                sock.recv(100)
                raise AssertionError("a lane socket queued a datagram")
            except BlockingIOError:
                pass
    finally:
        ep.close()
        recv.close()
    assert not ep.send(b"x", ("127.0.0.1", 9), 1)  # closed lanes refuse


# ---- flags ---------------------------------------------------------------------------------
def test_source_ports_flag_env_and_bounds() -> None:
    assert parse_args([], {}).source_ports == 8
    assert parse_args(["--source-ports", "0"], {}).source_ports == 0
    assert parse_args([], {"FLANNELD_SOURCE_PORTS": "16"}).source_ports == 16
    with pytest.raises(FlagError, match=r"--source-ports must be in 0\.\.64, got 65"):
        parse_args(["--source-ports", "65"], {})
    with pytest.raises(ConfigError, match=r"source_ports must be in 0\.\.64"):
        EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC, source_ports=-1)
