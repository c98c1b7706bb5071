"""TSO split for flannelette peers: TCP checksums left partial, completed by the receiver rule."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_EOL, IPOption_NOP

from dataplane import csum, gro, tso, vnet

PREFIX = bytes(range(22))


def super_packet(payload: bytes, flags: str, options: bool = False) -> bytes:
    ip_opts = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()] if options else []
    return bytes(IP(src="10.244.1.2", dst="10.244.2.2", id=65530, flags="DF", options=ip_opts)
                 / TCP(sport=40000, dport=5201, seq=0xFFFFF000, ack=99, flags=flags,
                       options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))])
                 / payload)


def split(pkt: bytes, mss: int, partial: bool) -> list[bytearray]:
    out = bytearray(2 * len(pkt) + 4096)
    used, segs, seglen = tso.tso_split(bytearray(pkt), 0, len(pkt), mss, out, PREFIX,
                                           partial)
    frames = [out[i:min(i + seglen, used)] for i in range(0, used, seglen)]
    assert len(frames) == segs and all(f[:22] == PREFIX for f in frames)
    return [f[22:] for f in frames]


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 30000), st.sampled_from([536, 1397, 1398, 1448]),
       st.sampled_from(["A", "PA", "FPA", "CA", "CPA"]), st.booleans())
def test_partial_split_differs_from_full_only_in_the_tcp_checksum(
        size: int, mss: int, flags: str, options: bool) -> None:
    payload = bytes((i * 13) & 0xFF for i in range(size))
    pkt = super_packet(payload, flags, options)
    ihl = 24 if options else 20
    full, part = split(pkt, mss, False), split(pkt, mss, True)
    assert len(full) == len(part) == -(-size // mss)
    for f, p in zip(full, part, strict=True):
        pos = ihl + csum.TCP_CSUM_OFFSET
        assert p[:pos] == f[:pos] and p[pos + 2:] == f[pos + 2:]
        # The field is the pseudo-header sum, exactly what the receiver rule looks for.
        field = struct.unpack_from("!H", p, pos)[0]
        assert field == csum.pseudo_header_sum(p, 0, 6, len(p) - ihl)
        rx = bytearray(22) + p
        assert vnet.fill_rx_vnet_hdr(rx, 12, 22, len(p), 9000) == vnet.RX_CSUM_PARTIAL
        hdr = vnet.VnetHdr.parse(rx[12:22])
        assert hdr.flags == vnet.F_NEEDS_CSUM and hdr.csum_start == ihl
        # Completing it as the receiving kernel would gives the full segment.
        csum.complete_checksum(rx, 22, len(p), hdr.csum_start, hdr.csum_offset)
        assert rx[22:] == f


def test_partial_segments_are_valid_tcp_once_completed() -> None:
    payload = bytes(range(256)) * 40
    segs = split(super_packet(payload, "FPA"), 1398, True)
    got = b""
    for i, raw in enumerate(segs):
        csum.complete_checksum(raw, 0, len(raw), 20, csum.TCP_CSUM_OFFSET)
        fresh = IP(bytes(raw))
        del fresh.chksum
        del fresh[TCP].chksum
        assert bytes(fresh) == bytes(raw)
        tcp = IP(bytes(raw))[TCP]
        assert tcp.seq == (0xFFFFF000 + i * 1398) & 0xFFFFFFFF  # wraps past 2**32
        assert IP(bytes(raw)).id == (65530 + i) & 0xFFFF
        last = i == len(segs) - 1
        assert ("F" in str(tcp.flags)) == last and ("P" in str(tcp.flags)) == last
        got += bytes(tcp.payload)
    assert got == payload


def test_gro_of_partial_segments_restores_the_super_packet() -> None:
    payload = bytes((i * 3) & 0xFF for i in range(20000))
    pkt = super_packet(payload, "PA")
    c = gro.Coalescer()
    segs = split(pkt, 1398, True)
    c.start(segs[0], 0, len(segs[0]))
    assert all(c.append(s, 0, len(s)) for s in segs[1:])
    view = c.finish(1500)
    hdr = vnet.VnetHdr.parse(view[:10])
    assert (hdr.flags, hdr.gso_type, hdr.gso_size) == (vnet.F_NEEDS_CSUM,
                                                       vnet.GSO_TCPV4, 1398)
    merged = bytes(view[10:])
    assert bytes(IP(merged)[TCP].payload) == payload and len(merged) == len(pkt)


# ---- Coalescer.extend: the rest of a UDP GRO batch in one pass --------------------------

VXPRE = bytes.fromhex("0800000000000100") + bytes.fromhex("0a11223344020a1122334401") + b"\x08\x00"


def gro_batch(segs: list[bytearray]) -> tuple[memoryview, int, int]:
    """Segments as one UDP GRO batch: VXLAN datagrams back to back, step = first's size."""
    data = bytearray()
    for s in segs:
        data += VXPRE + s
    return memoryview(data), len(data), 22 + len(segs[0])


def test_extend_takes_a_whole_batch_like_append_would() -> None:
    payload = bytes((i * 5) & 0xFF for i in range(1398 * 30 + 700))
    segs = split(super_packet(payload, "PA"), 1398, True)
    view, n, step = gro_batch(segs)
    c = gro.Coalescer()
    c.start(view[:step], 22, len(segs[0]))
    off, taken, nbytes = c.extend(view, step, n, step, VXPRE)
    # Full-size ACK segments are taken; the short PSH one is left for the generic path.
    assert taken == 29 and off == 30 * step and nbytes == 29 * len(segs[0])
    last = view[off:]
    assert c.append(last, 22, len(last) - 22)
    merged = bytes(c.finish(1500)[10:])
    assert bytes(IP(merged)[TCP].payload) == payload and "P" in str(IP(merged)[TCP].flags)
    # Same result as appending one by one.
    d = gro.Coalescer()
    d.start(segs[0], 0, len(segs[0]))
    assert all(d.append(s, 0, len(s)) for s in segs[1:])
    assert bytes(d.finish(1500)[10:]) == merged


def _corrupt(seg: bytearray, what: str) -> None:
    if what == "ip_checksum":
        seg[10] ^= 1
    elif what == "seq":
        seg[27] ^= 1
    elif what == "port":
        seg[21] ^= 1
    elif what == "window":
        seg[34] ^= 1
    elif what == "ttl":
        seg[8] -= 1
        seg[10] += 1  # checksum kept right: only the TTL differs from the first
    elif what == "option":
        seg[47] ^= 1


@pytest.mark.parametrize("what", ["ip_checksum", "seq", "port", "window", "ttl", "option",
                                  "vxlan", "mac"])
def test_extend_stops_at_a_segment_that_differs(what: str) -> None:
    segs = split(super_packet(bytes(1398 * 6), "A"), 1398, False)
    view, n, step = gro_batch(segs)
    buf = view.obj
    assert isinstance(buf, bytearray)
    bad = 3 * step
    if what == "vxlan":
        buf[bad + 6] ^= 1  # another VNI
    elif what == "mac":
        buf[bad + 14] ^= 1  # another source MAC
    else:
        seg = bytearray(buf[bad + 22:bad + step])
        _corrupt(seg, what)
        buf[bad + 22:bad + step] = seg
    c = gro.Coalescer()
    c.start(view[:step], 22, len(segs[0]))
    off, taken, _ = c.extend(view, step, n, step, VXPRE)
    assert (off, taken) == (bad, 2)
    assert c.count == 3 and c.ip_len == 52 + 3 * 1398


def test_extend_needs_a_full_size_open_packet() -> None:
    segs = split(super_packet(bytes(1000 * 4), "A"), 1000, False)
    view, n, step = gro_batch(segs)
    c = gro.Coalescer()
    assert c.extend(view, 0, n, step, VXPRE) == (0, 0, 0)  # nothing held
    c.start(view[:step], 22, len(segs[0]))
    assert c.extend(view, step, n, step + 1, VXPRE) == (step, 0, 0)  # other datagram size
