"""Tunnel GSO headers against scapy-built VXLAN datagrams (the bytes a kernel peer accepts)."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP, in4_pseudoheader
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import checksum

from dataplane import tunnel_gso as tg
from dataplane import wire
from dataplane.csum import ones_sum

SRC, DST = "10.10.1.1", "10.10.1.2"
DMAC, SMAC = bytes.fromhex("0a0000000202"), bytes.fromhex("0a0000000101")
PAYLOAD = bytes(range(256)) * 80  # 20480 bytes: a TCP super-packet


def _inner(opts: bytes = b"", flags: str = "PA") -> IP:
    tcp = TCP(sport=40000, dport=5001, seq=1000, ack=7, flags=flags, window=502, options=[])
    if opts:
        tcp = TCP(sport=40000, dport=5001, seq=1000, ack=7, flags=flags, window=502,
                  options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    return IP(src="10.244.1.2", dst="10.244.2.2", id=77, flags="DF") / tcp / PAYLOAD


def _scapy_datagram(inner: IP, sport: int, udp_chksum: int | None) -> bytes:
    pkt = (IP(src=SRC, dst=DST, id=5, ttl=64, flags=0)
           / UDP(sport=sport, dport=8472, chksum=udp_chksum)
           / VXLAN(vni=1, flags=0x08)
           / Ether(dst=wire.mac_to_str(DMAC), src=wire.mac_to_str(SMAC)) / inner)
    return bytes(pkt)


def _prefix(inner_len: int, sport: int, udp_csum: bool) -> bytes:
    return tg.build_tunnel_prefix(socket.inet_aton(SRC), socket.inet_aton(DST), sport, 1,
                                  DMAC, SMAC, inner_len, udp_csum=udp_csum, ident=5)


def test_prefix_without_udp_checksum_equals_scapy() -> None:
    inner = bytes(_inner())
    expected = _scapy_datagram(_inner(), 33333, udp_chksum=0)
    prefix = _prefix(len(inner), 33333, udp_csum=False)
    assert len(prefix) == tg.TUNNEL_PREFIX_LEN == wire.OVERHEAD
    assert prefix == expected[:tg.TUNNEL_PREFIX_LEN]
    assert prefix + inner == expected


def test_prefix_with_udp_checksum_holds_the_pseudo_sum_that_completes_to_scapys() -> None:
    inner = bytes(_inner())
    prefix = _prefix(len(inner), 40001, udp_csum=True)
    full = _scapy_datagram(_inner(), 40001, udp_chksum=None)  # scapy computes the checksum
    assert prefix[:26] == full[:26] and prefix[28:] == full[28:tg.TUNNEL_PREFIX_LEN]
    ulen = len(full) - 20
    pseudo = ~checksum(in4_pseudoheader(17, IP(full), ulen)) & 0xFFFF
    assert struct.unpack_from("!H", prefix, 26)[0] == pseudo
    # What the kernel does with a partial checksum: sum from the UDP header to the end.
    completed = ~ones_sum((prefix + inner)[20:]) & 0xFFFF
    assert completed == struct.unpack_from("!H", full, 26)[0]


def test_prefix_checks() -> None:
    with pytest.raises(ValueError):
        _prefix(65535 - 49, 1, False)
    with pytest.raises(ValueError):
        _prefix(0, 1, False)
    assert len(_prefix(65535 - 50, 1, False)) == 50
    df = tg.build_tunnel_prefix(b"\x0a\0\0\1", b"\x0a\0\0\2", 1, 1, DMAC, SMAC, 100, df=True)
    assert IP(df + bytes(100)).flags == "DF"


@pytest.mark.parametrize("opts", [b"", b"ts"])
def test_vnet_header_fields_point_at_the_scapy_layers(opts: bytes) -> None:
    inner_pkt = _inner(opts)
    inner = bytes(inner_pkt)
    sport = tg.src_port_for(inner)
    frame = tg.tap_header(bytes(6), SMAC) + _prefix(len(inner), sport, False) + inner
    hdr = tg.tunnel_vnet_hdr_for(inner, 1398, udp_csum=True)
    assert len(hdr) == tg.VNET_HDR_TNL_LEN == 24
    f = tg.parse_tunnel_vnet_hdr(hdr)
    assert f["flags"] == tg.F_NEEDS_CSUM | tg.F_UDP_TUNNEL_CSUM
    assert f["gso_type"] == tg.GSO_TCPV4 | tg.GSO_UDP_TUNNEL_IPV4 == 0x21
    assert f["gso_size"] == 1398
    assert f["num_buffers"] == f["hash_value"] == f["hash_report"] == f["padding"] == 0
    eth = Ether(frame)
    outer_th = f["outer_th_offset"]
    assert outer_th == 34 >= tg.MIN_OUTER_TH
    assert frame[outer_th:outer_th + 8] == bytes(eth[UDP])[:8]
    inner_nh = f["inner_nh_offset"]
    assert inner_nh == outer_th + 8 + 8 + 14 and frame[inner_nh:] == inner
    thl = len(inner_pkt[TCP]) - len(PAYLOAD)
    assert f["csum_start"] == inner_nh + 20 and f["csum_offset"] == 16
    assert f["hdr_len"] == f["csum_start"] + thl
    # csum_start + csum_offset is the inner TCP checksum field.
    tcp_ck = struct.unpack_from("!H", frame, f["csum_start"] + 16)[0]
    assert tcp_ck == inner_pkt[TCP].__class__(bytes(inner_pkt[TCP])).chksum
    # little endian on the wire of the write: gso_size 1398 = 0x0576
    assert hdr[4:6] == b"\x76\x05"


def test_vnet_header_plain_udp_and_ecn() -> None:
    cwr = bytes(_inner(flags="PAC"))
    f = tg.parse_tunnel_vnet_hdr(tg.tunnel_vnet_hdr_for(cwr, 1448))
    assert f["flags"] == tg.F_NEEDS_CSUM
    assert f["gso_type"] == tg.GSO_TCPV4 | tg.GSO_UDP_TUNNEL_IPV4 | tg.GSO_ECN


def test_vnet_header_refuses_a_tun_layout_and_zero_gso() -> None:
    with pytest.raises(ValueError, match="TAP"):
        tg.pack_tunnel_vnet_hdr(1398, l2_len=0)
    with pytest.raises(ValueError):
        tg.pack_tunnel_vnet_hdr(0)


def test_src_port_is_the_flow_hash_in_the_kernel_range() -> None:
    a = bytes(_inner())
    b = bytes(IP(src="10.244.1.2", dst="10.244.2.2") / TCP(sport=40001, dport=5001))
    pa, pb = tg.src_port_for(a), tg.src_port_for(b)
    assert wire.SRC_PORT_MIN <= pa <= wire.SRC_PORT_MAX
    assert wire.SRC_PORT_MIN <= pb <= wire.SRC_PORT_MAX
    assert pa == wire.flow_src_port(wire.flow_hash(a)) and pa != pb
    assert tg.src_port_for(b"\0" * 10 + a, off=10) == pa
