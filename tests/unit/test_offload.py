"""virtio_net_hdr rules for packets from kernel peers, and checksum helpers, against scapy."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, in4_pseudoheader
from scapy.utils import checksum

from dataplane import offload
from dataplane.offload import VnetHdr

MTU = 1450
HDR_OFF = 12
IP_OFF = 22


def partial(pkt: IP) -> bytes:
    """``pkt`` as a kernel VXLAN sender leaves it: L4 field = pseudo-header sum only."""
    raw = bytearray(bytes(pkt))
    ihl = (raw[0] & 0x0F) * 4
    proto = raw[9]
    l4len = len(raw) - ihl
    pseudo = ~checksum(in4_pseudoheader(proto, pkt, l4len)) & 0xFFFF
    pos = ihl + (16 if proto == 6 else 6)
    struct.pack_into("!H", raw, pos, pseudo)
    return bytes(raw)


def place(packet: bytes) -> bytearray:
    return bytearray(IP_OFF) + bytearray(packet)


def hdr(buf: bytearray) -> VnetHdr:
    return VnetHdr.parse(buf[HDR_OFF:HDR_OFF + offload.VNET_HDR_LEN])


def test_vnet_hdr_golden_native_order() -> None:
    h = VnetHdr(1, 0x81, 52, 1398, 20, 16)
    assert h.pack() == struct.pack("=BBHHHH", 1, 0x81, 52, 1398, 20, 16)
    assert len(h.pack()) == 10
    assert VnetHdr.parse(h.pack()) == h


@given(st.integers(0, 255), st.integers(0, 255), *[st.integers(0, 0xFFFF)] * 4)
def test_vnet_hdr_round_trip(a: int, b: int, c: int, d: int, e: int, f: int) -> None:
    h = VnetHdr(a, b, c, d, e, f)
    assert VnetHdr.parse(h.pack()) == h


def test_full_checksum_is_written_plain() -> None:
    pkt = bytes(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="A") / (b"d" * 100))
    buf = place(pkt)
    assert offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == offload.RX_PLAIN
    assert hdr(buf) == VnetHdr()
    assert bytes(buf[IP_OFF:]) == pkt


def test_partial_tcp_checksum_gets_needs_csum() -> None:
    pkt = partial(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="PA") / (b"d" * 1000))
    buf = place(pkt)
    kind = offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU)
    assert kind == offload.RX_CSUM_PARTIAL
    assert hdr(buf) == VnetHdr(offload.F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    assert bytes(buf[IP_OFF:]) == pkt  # the packet itself untouched


def test_partial_udp_checksum_gets_needs_csum() -> None:
    pkt = partial(IP(src="10.244.2.2", dst="10.244.1.2") / UDP(sport=5, dport=6) / (b"q" * 3))
    buf = place(pkt)
    assert offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == 1
    assert hdr(buf) == VnetHdr(offload.F_NEEDS_CSUM, 0, 0, 0, 20, 6)


def test_icmp_and_fragments_are_plain() -> None:
    for pkt in (bytes(IP(proto=1) / b"12345678"),
                bytes(IP(flags="MF", proto=6) / (b"x" * 40))):
        buf = place(pkt)
        assert offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == 0
        assert hdr(buf) == VnetHdr()


def test_unsegmented_tcp_gets_gso_tcpv4() -> None:
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    pkt = partial(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="A", options=opts)
                  / (b"s" * 60000))
    buf = place(pkt)
    assert offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == offload.RX_GSO
    assert hdr(buf) == VnetHdr(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 52, MTU - 52, 20, 16)


def test_gso_with_cwr_sets_ecn_and_resets_full_checksum_to_pseudo() -> None:
    full = bytes(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="AC") / (b"s" * 5000))
    buf = place(full)
    assert offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(full), MTU) == offload.RX_GSO
    h = hdr(buf)
    assert h.gso_type == offload.GSO_TCPV4 | offload.GSO_ECN and h.gso_size == MTU - 40
    pseudo = ~checksum(in4_pseudoheader(6, IP(full), len(full) - 20)) & 0xFFFF
    assert struct.unpack_from("!H", buf, IP_OFF + 20 + 16)[0] == pseudo


@given(st.binary(max_size=1400), st.sampled_from(["tcp", "udp"]))
def test_l4_checksum_matches_scapy(payload: bytes, kind: str) -> None:
    l4 = TCP(sport=1, dport=2) if kind == "tcp" else UDP(sport=1, dport=2)
    pkt = bytes(IP(src="10.1.2.3", dst="10.3.2.1") / l4 / payload)
    pos = 20 + (16 if kind == "tcp" else 6)
    assert offload.l4_checksum(pkt, 0, len(pkt)) == struct.unpack_from("!H", pkt, pos)[0]


@given(st.binary(max_size=1400))
def test_partial_rule_never_flags_a_full_checksum_unless_equal(payload: bytes) -> None:
    pkt = bytes(IP(src="10.1.2.3", dst="10.3.2.1") / TCP() / payload)
    buf = place(pkt)
    kind = offload.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU)
    pseudo = offload.pseudo_header_sum(pkt, 0, 6, len(pkt) - 20)
    field = struct.unpack_from("!H", pkt, 36)[0]
    assert (kind == offload.RX_CSUM_PARTIAL) == (field == pseudo)
