"""The VXLAN wire codec against frames scapy builds, plus round trips and drop reasons."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

from dataplane import csum, wire
from dataplane.errors import ConfigError
from dataplane.wire import DropReason, Frame

OWN = bytes.fromhex("0a1122334401")
PEER = bytes.fromhex("0a1122334402")
OWN_S, PEER_S = wire.mac_to_str(OWN), wire.mac_to_str(PEER)
MTU = 1450
SUBNET = ipaddress.IPv4Network("10.244.1.0/24")
macs = st.binary(min_size=6, max_size=6)


def inner(payload_len: int = 32, **ip_kw: Any) -> bytes:
    kw: dict[str, Any] = {"src": "10.244.2.2", "dst": "10.244.1.2"}
    kw.update(ip_kw)
    return bytes(IP(**kw) / UDP(sport=1234, dport=5678) / (b"x" * payload_len))


def frame(payload: bytes, vni: int = 1, dst: bytes = OWN, src: bytes = PEER,
          ethertype: int = wire.ETH_P_IP) -> bytes:
    return wire.build_frame(vni, dst, src, payload, ethertype)


def check(data: bytes, peer_known: bool = True) -> Frame | DropReason:
    return wire.check_frame(bytearray(data), len(data), wire.vxlan_header(1), OWN, MTU,
                            peer_known)


# ---- golden bytes against scapy ---------------------------------------------------------

def test_vxlan_ethernet_ipv4_frame_matches_scapy() -> None:
    ip = IP(src="10.244.1.2", dst="10.244.2.2", ttl=63) / ICMP(id=7, seq=1) / b"ping"
    ours = wire.build_frame(0xABCDEF, PEER, OWN, bytes(ip))
    theirs = bytes(VXLAN(flags=0x08, vni=0xABCDEF) / Ether(dst=PEER_S, src=OWN_S) / ip)
    assert ours == theirs
    assert ours[:8] == bytes.fromhex("08000000abcdef00")


@pytest.mark.parametrize("vni", [0, 1, 4096, 0xFFFFFF])
def test_vxlan_header_golden(vni: int) -> None:
    assert wire.vxlan_header(vni) == bytes(VXLAN(flags=0x08, vni=vni))
    assert wire.parse_vxlan_header(wire.vxlan_header(vni)) == vni


def test_vxlan_header_rejects_out_of_range_vni() -> None:
    with pytest.raises(ConfigError):
        wire.vxlan_header(1 << 24)


def test_arp_reply_matches_scapy() -> None:
    req = Ether(dst="ff:ff:ff:ff:ff:ff", src=PEER_S) / ARP(
        op=1, hwsrc=PEER_S, psrc="10.244.2.0", hwdst="00:00:00:00:00:00", pdst="10.244.1.0")
    body = bytes(req)[14:]
    answer = wire.arp_answer(wire.vxlan_header(1), OWN, SUBNET, body)
    expected = VXLAN(flags=0x08, vni=1) / Ether(dst=PEER_S, src=OWN_S) / ARP(
        op=2, hwsrc=OWN_S, psrc="10.244.1.0", hwdst=PEER_S, pdst="10.244.2.0")
    assert answer == bytes(expected)
    parsed = wire.parse_arp(body)
    assert parsed == wire.ArpPacket(1, PEER, bytes([10, 244, 2, 0]), bytes(6),
                                    bytes([10, 244, 1, 0]))


def test_ipv4_header_matches_scapy() -> None:
    ours = wire.ipv4_header(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, 100, ttl=9,
                            tos=0x10, ident=0x1234, flags_frag=0x4000)
    theirs = bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=17, len=120, ttl=9, tos=0x10,
                      id=0x1234, flags="DF"))
    assert ours == theirs


def test_icmp_host_unreachable_matches_scapy() -> None:
    orig = bytes(IP(src="10.244.1.2", dst="10.244.9.9", id=99) / TCP(sport=40000, dport=80)
                 / b"hello world")
    ours = wire.icmp_unreachable(orig, bytes([10, 244, 1, 0]))
    theirs = bytes(IP(src="10.244.1.0", dst="10.244.1.2", tos=0xC0, id=0, ttl=64)
                   / ICMP(type=3, code=1) / orig[:28])
    assert ours == theirs


@pytest.mark.parametrize("orig", [
    bytes(IP(src="10.244.1.2", dst="10.244.9.9") / ICMP(type=3, code=1) / (b"\0" * 28)),
    bytes(IP(src="10.244.1.2", dst="10.244.9.9", frag=100) / (b"\0" * 16)),
    bytes(IP(src="0.0.0.0", dst="10.244.9.9") / UDP()),
    bytes(IP(src="224.0.0.1", dst="10.244.9.9") / UDP()),
    b"\x45\x00",
])
def test_icmp_unreachable_never_answers_errors_fragments_or_odd_sources(orig: bytes) -> None:
    assert wire.icmp_unreachable(orig, bytes([10, 244, 1, 0])) is None


def test_icmp_unreachable_answers_echo_request() -> None:
    orig = bytes(IP(src="10.244.1.2", dst="10.244.9.9") / ICMP(type=8) / b"abc")
    reply = wire.icmp_unreachable(orig, bytes([10, 244, 1, 0]))
    assert reply is not None
    parsed = IP(reply)
    assert parsed[ICMP].type == 3 and parsed[ICMP].code == 1
    assert parsed.dst == "10.244.1.2"


def test_checksums_match_scapy() -> None:
    from scapy.utils import checksum

    for data in (b"", b"\x01", b"\xff\xff", bytes(range(255)), b"\x00" * 7):
        assert csum.internet_checksum(data) == (checksum(data) if data else 0xFFFF)


# ---- MACs -------------------------------------------------------------------------------

def test_random_vtep_mac_is_local_unicast() -> None:
    for _ in range(50):
        mac = wire.random_vtep_mac()
        assert mac[0] & 1 == 0 and mac[0] & 2 == 2
    assert wire.random_vtep_mac(b"\xff" * 6) == b"\xfe" + b"\xff" * 5


def test_mac_strings() -> None:
    assert wire.mac_to_str(bytes.fromhex("C6D2326F8F44")) == "c6:d2:32:6f:8f:44"
    assert wire.mac_from_str("C6:D2:32:6F:8F:44") == bytes.fromhex("c6d2326f8f44")
    for bad in ("", "c6:d2:32:6f:8f", "c6:d2:32:6f:8f:4g", "c6d2326f8f44", "1:2:3:4:5:6"):
        with pytest.raises(ConfigError):
            wire.mac_from_str(bad)


# ---- round trips ------------------------------------------------------------------------

@given(st.integers(0, (1 << 24) - 1))
def test_vni_round_trip(vni: int) -> None:
    assert wire.parse_vxlan_header(wire.vxlan_header(vni)) == vni


@given(macs)
def test_mac_round_trip(mac: bytes) -> None:
    assert wire.mac_from_str(wire.mac_to_str(mac)) == mac


@settings(deadline=None)  # scapy builds each example: slow on a loaded machine
@given(st.sampled_from([1, 2]), macs, st.binary(min_size=4, max_size=4), macs,
       st.binary(min_size=4, max_size=4))
def test_arp_round_trip(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> None:
    arp = wire.ArpPacket(op, sha, spa, tha, tpa)
    assert wire.parse_arp(arp.pack()) == arp
    assert arp.pack() == bytes(ARP(op=op, hwsrc=wire.mac_to_str(sha), hwdst=wire.mac_to_str(tha),
                                   psrc=str(ipaddress.IPv4Address(spa)),
                                   pdst=str(ipaddress.IPv4Address(tpa))))


@settings(deadline=None)  # scapy builds each example: slow on a loaded machine
@given(st.binary(min_size=0, max_size=MTU - 28), st.integers(1, 255))
def test_valid_frames_pass_and_decapsulate(payload: bytes, ttl: int) -> None:
    ip = bytes(IP(src="10.244.2.2", dst="10.244.1.2", ttl=ttl) / UDP() / payload)
    data = frame(ip)
    assert check(data) is Frame.IPV4
    assert data[wire.ENCAP_HLEN:] == ip


@given(st.binary(min_size=0, max_size=64))
def test_checksum_verifies(data: bytes) -> None:
    c = csum.internet_checksum(data)
    padded = data + (b"\0" if len(data) & 1 else b"")
    assert csum.ones_sum(padded + struct.pack("!H", c)) == 0xFFFF


@given(st.binary(min_size=40, max_size=60))
def test_flow_src_port_in_kernel_range(packet: bytes) -> None:
    port = wire.flow_src_port(wire.flow_hash(bytes([0x45]) + packet[1:]))
    assert wire.SRC_PORT_MIN <= port <= wire.SRC_PORT_MAX


def test_flow_hash_stable_per_flow_and_spreads() -> None:
    a = inner(src="10.244.2.2")
    assert wire.flow_hash(a) == wire.flow_hash(inner(src="10.244.2.2", payload_len=99))
    ports = {wire.flow_src_port(wire.flow_hash(bytes(
        IP(src="10.244.2.2", dst="10.244.1.2") / TCP(sport=s, dport=80)))) for s in range(200)}
    assert len(ports) > 150
    assert wire.flow_src_port(0) == wire.SRC_PORT_MIN
    assert wire.flow_src_port(0xFFFFFFFF) <= wire.SRC_PORT_MAX


# ---- every drop reason ------------------------------------------------------------------

def _bad_ip_checksum() -> bytes:
    ip = bytearray(inner())
    ip[10] ^= 0xFF
    return frame(bytes(ip))


def _arp_body(op: int = 1, tpa: str = "10.244.1.0", hlen: int = 6) -> bytes:
    a = ARP(op=op, hwsrc=PEER_S, psrc="10.244.2.0", pdst=tpa)
    a.hwlen = hlen
    return bytes(a)


RX_CASES: list[tuple[str, bytes, bool, DropReason]] = [
    ("short datagram", frame(inner())[:21], True, DropReason.TRUNCATED),
    ("short ip header", frame(inner())[:30], True, DropReason.TRUNCATED),
    ("ip total length beyond datagram", frame(inner())[:-5], True, DropReason.TRUNCATED),
    ("G flag (GBP)", b"\x88" + frame(inner())[1:], True, DropReason.BAD_FLAGS),
    ("no I flag", b"\x00" + frame(inner())[1:], True, DropReason.BAD_FLAGS),
    ("reserved byte 1", frame(inner())[:1] + b"\x01" + frame(inner())[2:], True,
     DropReason.BAD_FLAGS),
    ("reserved last byte", frame(inner())[:7] + b"\x01" + frame(inner())[8:], True,
     DropReason.BAD_FLAGS),
    ("other vni", frame(inner(), vni=2), True, DropReason.WRONG_VNI),
    ("unknown source", frame(inner()), False, DropReason.UNKNOWN_PEER),
    ("own mac as source", frame(inner(), src=OWN), True, DropReason.OWN_MAC_SOURCE),
    ("other dst mac", frame(inner(), dst=PEER), True, DropReason.NOT_FOR_US),
    ("broadcast ipv4", frame(inner(), dst=wire.BROADCAST_MAC), True, DropReason.NOT_FOR_US),
    ("arp to other mac", frame(_arp_body(), dst=PEER, ethertype=wire.ETH_P_ARP), True,
     DropReason.NOT_FOR_US),
    ("ipv6", frame(b"\x60" + bytes(60), ethertype=wire.ETH_P_IPV6), True, DropReason.NOT_IPV4),
    ("ipv4 ethertype, version 6", frame(b"\x65" + inner()[1:]), True,
     DropReason.BAD_IPV4_HEADER),
    ("ihl 4", frame(b"\x44" + inner()[1:]), True, DropReason.BAD_IPV4_HEADER),
    ("ip header checksum", _bad_ip_checksum(), True, DropReason.BAD_IPV4_HEADER),
    ("total length below ihl", frame(bytes(IP(len=12) / UDP())), True,
     DropReason.BAD_IPV4_HEADER),
    ("ttl 0", frame(inner(ttl=0)), True, DropReason.TTL_EXPIRED),
    ("udp above mtu", frame(inner(payload_len=MTU)), True, DropReason.OVERSIZE),
    ("tcp fragment above mtu", frame(bytes(IP(flags="MF") / TCP() / (b"x" * MTU))), True,
     DropReason.OVERSIZE),
]


@pytest.mark.parametrize(("name", "data", "known", "reason"), RX_CASES,
                         ids=[c[0] for c in RX_CASES])
def test_rx_drop_reasons(name: str, data: bytes, known: bool, reason: DropReason) -> None:
    assert check(data, known) is reason


def test_large_unfragmented_tcp_passes_for_gso() -> None:
    big = bytes(IP(src="10.244.2.2", dst="10.244.1.2") / TCP() / (b"x" * 30000))
    assert check(frame(big)) is Frame.IPV4


def test_padding_after_ip_packet_is_accepted() -> None:
    assert check(frame(inner(payload_len=2) + b"\0" * 20)) is Frame.IPV4


ARP_CASES: list[tuple[str, bytes, DropReason | None]] = [
    ("request for our vtep address", _arp_body(), None),
    ("request for another address of our subnet", _arp_body(tpa="10.244.1.77"), None),
    ("request for an address outside our subnet", _arp_body(tpa="10.244.3.0"),
     DropReason.ARP_IGNORED),
    ("reply", _arp_body(op=2), DropReason.ARP_IGNORED),
    ("hardware length 8", _arp_body(hlen=8), DropReason.BAD_ARP),
    ("truncated", _arp_body()[:20], DropReason.TRUNCATED),
]


@pytest.mark.parametrize(("name", "body", "reason"), ARP_CASES, ids=[c[0] for c in ARP_CASES])
def test_arp_answers_and_drop_reasons(name: str, body: bytes, reason: DropReason | None) -> None:
    data = frame(body, dst=wire.BROADCAST_MAC, ethertype=wire.ETH_P_ARP)
    assert check(data) is Frame.ARP
    answer = wire.arp_answer(wire.vxlan_header(1), OWN, SUBNET, data[wire.ENCAP_HLEN:])
    if reason is None:
        assert isinstance(answer, bytes)
        # The requester (PEER) accepts it as an ARP frame for its own MAC.
        assert wire.check_frame(answer, len(answer), wire.vxlan_header(1), PEER, MTU,
                                True) is Frame.ARP
        assert ARP(answer[wire.ENCAP_HLEN:]).psrc == ARP(body).pdst
    else:
        assert answer is reason


TUN_CASES: list[tuple[str, bytes, DropReason | None]] = [
    ("ipv4", inner(), None),
    ("short", inner()[:19], DropReason.TRUNCATED),
    ("ipv6 router solicitation", b"\x60" + bytes(47), DropReason.NOT_IPV4),
    ("above mtu", inner(payload_len=MTU), DropReason.OVERSIZE),
]


@pytest.mark.parametrize(("name", "packet", "reason"), TUN_CASES, ids=[c[0] for c in TUN_CASES])
def test_tun_packet_drop_reasons(name: str, packet: bytes, reason: DropReason | None) -> None:
    assert wire.check_tun_packet(packet, 0, len(packet), MTU) is reason


def test_every_drop_reason_has_a_case() -> None:
    """Every reason is covered by a table above, except those the engine decides.

    no_route is a FIB miss, spoofed_inner_source the per-peer source check,
    unsupported_gso a TUN super-packet, the rest failing system calls: all in
    tests/unit/test_engine_loops.py on fake devices.
    """
    covered = {c[3] for c in RX_CASES} | {c[2] for c in ARP_CASES if c[2]} | {
        c[2] for c in TUN_CASES if c[2]}
    io_only = {DropReason.NO_ROUTE, DropReason.SEND_FAILED, DropReason.TUN_WRITE_FAILED,
               DropReason.SPOOFED_INNER_SOURCE, DropReason.UNSUPPORTED_GSO,
               DropReason.TUN_READ_FAILED, DropReason.UDP_RECV_FAILED}
    assert covered == set(DropReason) - io_only
    assert covered == wire.RX_REASONS
    assert len({r.value for r in DropReason}) == len(DropReason)
