"""virtio_net_hdr rules for packets from kernel peers, and checksum helpers, against scapy."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, in4_pseudoheader
from scapy.utils import checksum

from dataplane import csum, gro, tso, vnet
from dataplane.vnet import VnetHdr

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
    return VnetHdr.parse(buf[HDR_OFF:HDR_OFF + vnet.VNET_HDR_LEN])


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
    assert vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == vnet.RX_PLAIN
    assert hdr(buf) == VnetHdr()
    assert bytes(buf[IP_OFF:]) == pkt


def test_partial_tcp_checksum_gets_needs_csum() -> None:
    pkt = partial(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="PA") / (b"d" * 1000))
    buf = place(pkt)
    kind = vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU)
    assert kind == vnet.RX_CSUM_PARTIAL
    assert hdr(buf) == VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    assert bytes(buf[IP_OFF:]) == pkt  # the packet itself untouched


def test_partial_udp_checksum_gets_needs_csum() -> None:
    pkt = partial(IP(src="10.244.2.2", dst="10.244.1.2") / UDP(sport=5, dport=6) / (b"q" * 3))
    buf = place(pkt)
    assert vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == 1
    assert hdr(buf) == VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 6)


def test_icmp_and_fragments_are_plain() -> None:
    for pkt in (bytes(IP(proto=1) / b"12345678"),
                bytes(IP(flags="MF", proto=6) / (b"x" * 40))):
        buf = place(pkt)
        assert vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == 0
        assert hdr(buf) == VnetHdr()


def test_unsegmented_tcp_gets_gso_tcpv4() -> None:
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    pkt = partial(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="A", options=opts)
                  / (b"s" * 60000))
    buf = place(pkt)
    assert vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU) == vnet.RX_GSO
    assert hdr(buf) == VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, MTU - 52, 20, 16)


def test_gso_with_cwr_sets_ecn_and_resets_full_checksum_to_pseudo() -> None:
    full = bytes(IP(src="10.244.2.2", dst="10.244.1.2") / TCP(flags="AC") / (b"s" * 5000))
    buf = place(full)
    assert vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(full), MTU) == vnet.RX_GSO
    h = hdr(buf)
    assert h.gso_type == vnet.GSO_TCPV4 | vnet.GSO_ECN and h.gso_size == MTU - 40
    pseudo = ~checksum(in4_pseudoheader(6, IP(full), len(full) - 20)) & 0xFFFF
    assert struct.unpack_from("!H", buf, IP_OFF + 20 + 16)[0] == pseudo


@settings(deadline=None)  # scapy builds each example: slow on a loaded machine
@given(st.binary(max_size=1400), st.sampled_from(["tcp", "udp"]))
def test_l4_checksum_matches_scapy(payload: bytes, kind: str) -> None:
    l4 = TCP(sport=1, dport=2) if kind == "tcp" else UDP(sport=1, dport=2)
    pkt = bytes(IP(src="10.1.2.3", dst="10.3.2.1") / l4 / payload)
    pos = 20 + (16 if kind == "tcp" else 6)
    assert csum.l4_checksum(pkt, 0, len(pkt)) == struct.unpack_from("!H", pkt, pos)[0]


@settings(deadline=None)  # scapy builds each example: slow on a loaded machine
@given(st.binary(max_size=1400))
def test_partial_rule_never_flags_a_full_checksum_unless_equal(payload: bytes) -> None:
    pkt = bytes(IP(src="10.1.2.3", dst="10.3.2.1") / TCP() / payload)
    buf = place(pkt)
    kind = vnet.fill_rx_vnet_hdr(buf, HDR_OFF, IP_OFF, len(pkt), MTU)
    pseudo = csum.pseudo_header_sum(pkt, 0, 6, len(pkt) - 20)
    field = struct.unpack_from("!H", pkt, 36)[0]
    assert (kind == vnet.RX_CSUM_PARTIAL) == (field == pseudo)


# ---- TSO split and userspace GRO --------------------------------------------------------

PREFIX = bytes(range(22))


def super_packet(payload: bytes, flags: str = "PA", seq: int = 1000, ident: int = 7) -> bytes:
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]
    return bytes(IP(src="10.244.1.2", dst="10.244.2.2", id=ident, flags="DF")
                 / TCP(sport=40000, dport=5201, seq=seq, ack=99, flags=flags, options=opts)
                 / payload)


def split(pkt: bytes, mss: int) -> list[bytes]:
    out = bytearray(2 * len(pkt) + 4096)
    used, segs, seglen = tso.tso_split(bytearray(pkt), 0, len(pkt), mss, out, PREFIX)
    assert seglen == 22 + 52 + mss
    frames = [bytes(out[i:min(i + seglen, used)]) for i in range(0, used, seglen)]
    assert len(frames) == segs and all(f[:22] == PREFIX for f in frames)
    return [f[22:] for f in frames]


@settings(deadline=None, max_examples=40)  # scapy dissects every segment: slow, loaded CI
@given(st.integers(1, 20000), st.sampled_from([536, 1398, 1448]),
       st.sampled_from(["A", "PA", "FPA", "CA"]))
def test_tso_split_matches_what_scapy_would_send(size: int, mss: int, flags: str) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    segs = split(super_packet(payload, flags), mss)
    assert len(segs) == -(-size // mss)
    got = b""
    for i, raw in enumerate(segs):
        p = IP(raw)
        tcp = p[TCP]
        fresh = IP(raw)
        del fresh.chksum
        del fresh[TCP].chksum
        assert bytes(fresh) == raw  # header and TCP checksums are the full, correct ones
        assert p.id == 7 + i and p.len == len(raw)
        assert tcp.seq == 1000 + i * mss
        last = i == len(segs) - 1
        assert ("P" in str(tcp.flags)) == ("P" in flags and last)
        assert ("F" in str(tcp.flags)) == ("F" in flags and last)
        assert ("C" in str(tcp.flags)) == ("C" in flags and i == 0)
        got += bytes(tcp.payload)
    assert got == payload


def test_complete_checksum_finishes_partial_tcp_and_udp() -> None:
    for pkt in (IP(src="10.0.0.1", dst="10.0.0.2") / TCP() / (b"z" * 333),
                IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"z" * 333)):
        want = bytes(pkt)
        buf = bytearray(partial(IP(want)))
        off = 16 if pkt.haslayer(TCP) else 6
        csum.complete_checksum(buf, 0, len(buf), 20, off)
        assert bytes(buf) == want


def coalesce(segments: list[bytes], mtu: int = 1500) -> list[tuple[VnetHdr, bytes]]:
    """Feed segments through a Coalescer as the engine does; return what it writes."""
    c = gro.Coalescer()
    written: list[tuple[VnetHdr, bytes]] = []

    def emit(view: memoryview) -> None:
        written.append((VnetHdr.parse(view[:10]), bytes(view[10:])))

    for s in segments:
        b = bytearray(s)
        if c.ip_len and c.append(b, 0, len(b)):
            continue
        if c.ip_len:
            emit(c.finish(mtu))
        if c.can_start(b, 0, len(b), mtu):
            c.start(b, 0, len(b))
        else:
            written.append((VnetHdr(), bytes(b)))
    if c.ip_len:
        emit(c.finish(mtu))
    return written


def test_gro_merges_a_split_super_packet_back() -> None:
    payload = bytes(i & 0xFF for i in range(30000))
    pkt = super_packet(payload, "PA")
    out = coalesce(split(pkt, 1398))
    assert len(out) == 1
    h, merged = out[0]
    assert h == VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1398, 20, 16)
    p = IP(merged)
    assert bytes(p[TCP].payload) == payload and p.len == len(pkt) and p.id == 7
    assert "P" in str(p[TCP].flags)
    fresh = IP(merged)
    del fresh.chksum
    assert bytes(fresh)[:20] == merged[:20]  # IPv4 header checksum recomputed
    assert struct.unpack_from("!H", merged, 36)[0] == csum.pseudo_header_sum(
        merged, 0, 6, len(merged) - 20)


def test_gro_keeps_flows_apart_and_refuses_gaps() -> None:
    a = split(super_packet(b"a" * 4000, "A", seq=1), 1000)
    other = bytes(IP(src="10.244.1.3", dst="10.244.2.2") / TCP(sport=1, dport=2, flags="A")
                  / (b"b" * 1000))
    out = coalesce([a[0], a[1], other, a[2], a[3]])
    assert [len(p) - 52 for _, p in out[:1]] == [2000]
    assert len(out) == 3
    gap = coalesce([a[0], a[2]])
    assert len(gap) == 2 and all(h.gso_type == 0 for h, _ in gap)
    assert IP(gap[0][1])[TCP].seq == 1


def test_gro_passes_syn_fin_and_single_segments_through() -> None:
    syn = bytes(IP() / TCP(flags="S"))
    fin = super_packet(b"f" * 10, "FA")
    one = super_packet(b"o" * 100, "A")
    out = coalesce([syn, fin, one])
    assert [p for _, p in out] == [syn, fin, one]
    assert out[2][0].gso_type == 0


def test_tso_split_with_ip_options_takes_the_generic_path() -> None:
    from scapy.layers.inet import IPOption_EOL, IPOption_NOP

    opts = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()]
    payload = bytes(range(256)) * 20
    pkt = bytes(IP(src="10.244.1.2", dst="10.244.2.2", id=3, options=opts)
                / TCP(seq=5, flags="PA") / payload)
    assert pkt[0] == 0x46
    out = bytearray(2 * len(pkt) + 4096)
    used, segs, seglen = tso.tso_split(bytearray(pkt), 0, len(pkt), 1000, out, PREFIX)
    assert segs == 6 and seglen == 22 + 44 + 1000
    got = b""
    for i in range(segs):
        raw = bytes(out[i * seglen + 22:min((i + 1) * seglen, used)])
        fresh = IP(raw)
        del fresh.chksum
        del fresh[TCP].chksum
        assert bytes(fresh) == raw
        assert IP(raw).id == 3 + i and IP(raw)[TCP].seq == 5 + 1000 * i
        got += bytes(IP(raw)[TCP].payload)
    assert got == payload
