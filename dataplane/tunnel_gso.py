"""Tunnel GSO: one write hands the kernel a VXLAN-wrapped TCP super-packet to segment.

Kernel >= 6.17 accepts, on a TUN/TAP opened with ``IFF_VNET_HDR`` and
``TUNSETVNETHDRSZ`` 24, the ``virtio_net_hdr_v1_hash_tunnel`` header (facts
read from include/uapi/linux/virtio_net.h, include/linux/virtio_net.h
``virtio_net_hdr_tnl_to_skb``, drivers/net/tun_vnet.h and checked on 6.18 by
benchmarks/tunnel_gso_probe.py)::

    0  flags u8        NEEDS_CSUM (1, required) | UDP_TUNNEL_CSUM (8, optional)
    1  gso_type u8     TCPV4 (1) | UDP_TUNNEL_IPV4 (0x20) [| ECN 0x80]
    2  hdr_len u16     up to the end of the inner TCP header (a hint)
    4  gso_size u16    inner MSS
    6  csum_start u16  offset of the INNER TCP header
    8  csum_offset u16 16 (TCP checksum field)
    10 num_buffers u16 0
    12 hash_value u32, hash_report u16, padding u16: 0 (tun ignores them)
    20 outer_th_offset u16: offset of the outer UDP header
    22 inner_nh_offset u16: offset of the inner IPv4 header

All fields little endian: the tunnel path parses the base header as LE
whatever TUNSETVNETLE says, and the two offsets are ``__le16``. Offsets count
from the first byte after the vnet header. The kernel refuses (EINVAL) an
``outer_th_offset`` below 14 + 20: it assumes an Ethernet header in front of the
outer IP, so the write must go to a **TAP** (``IFF_TAP``), not to an
``IFF_TUN`` device (measured: EINVAL on a TUN unless 16 bytes of IP options pad
the outer header, and those then fragment every segment). The inner Ethernet
header is carried as part of the tunnel header (inner_mac = inner_nh): the
kernel copies UDP + VXLAN + inner Ethernet into every segment verbatim.

Checksums the kernel expects in the super-packet:
- outer IPv4: complete (the TAP write goes through ip_rcv, which checks it);
  the kernel rewrites id (+1 per segment), total length and checksum per segment;
- outer UDP: 0 without ``UDP_TUNNEL_CSUM`` (copied as is into every segment,
  so it must be 0, which VXLAN over IPv4 allows and flannel's kernel device
  sends); with it, the pseudo-header sum (folded, not complemented) over the
  super-packet's UDP length, which the kernel re-bases per segment length;
- inner TCP: the pseudo-header sum over the super-packet's TCP length, i.e.
  exactly what a TSO read from the overlay TUN already holds (NEEDS_CSUM).

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct

from dataplane import wire
from dataplane.csum import fold_pseudo, internet_checksum

VNET_HDR_TNL_LEN = 24  # sizeof(struct virtio_net_hdr_v1_hash_tunnel): TUNSETVNETHDRSZ value
TNL_VNET_HDR = struct.Struct("<BBHHHHHIHHHH")

# TUNSETOFFLOAD bits (include/uapi/linux/if_tun.h). The tunnel bits are refused
# unless a plain TSO/USO bit comes with them; they only govern what the kernel
# may hand *us* on read: writes are accepted once the header size is >= 24.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UDP_TUNNEL_GSO = 0x80
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100
TUN_F_TUNNEL_PROBE = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM

# virtio_net_hdr flags and gso_type bits.
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
F_UDP_TUNNEL_CSUM = 8
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_TUNNEL_IPV4 = 0x20
GSO_UDP_TUNNEL_IPV6 = 0x40
GSO_ECN = 0x80

ETH_HLEN = wire.ETH_HLEN
TAP_L2_LEN = ETH_HLEN  # the TAP frame's own Ethernet header in front of the outer IPv4
OUTER_IP_HLEN = 20
UDP_HLEN = 8
TUNNEL_PREFIX_LEN = OUTER_IP_HLEN + UDP_HLEN + wire.ENCAP_HLEN  # 50 = wire.OVERHEAD
MIN_OUTER_TH = ETH_HLEN + OUTER_IP_HLEN  # the kernel's lower bound for outer_th_offset
TCP_CSUM_OFFSET = 16
MAX_IP_LEN = 0xFFFF

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def build_tunnel_prefix(outer_src: bytes, outer_dst: bytes, src_port: int, vni: int,
                        dst_mac: bytes, src_mac: bytes, inner_len: int, *,
                        dst_port: int = wire.VXLAN_PORT, udp_csum: bool = False,
                        ident: int = 0, ttl: int = 64, tos: int = 0,
                        df: bool = False) -> bytes:
    """Outer IPv4 + UDP + VXLAN + inner Ethernet (50 bytes) for an inner packet of ``inner_len``.

    The outer IPv4 checksum is complete; the UDP checksum is 0, or with
    ``udp_csum`` the pseudo-header sum the kernel completes per segment
    (``UDP_TUNNEL_CSUM``). ``df`` defaults off as on flannel's kernel device.
    """
    total = TUNNEL_PREFIX_LEN + inner_len
    if inner_len <= 0 or total > MAX_IP_LEN:
        raise ValueError(f"inner packet of {inner_len} bytes does not fit one outer IPv4 packet")
    if not 0 <= src_port <= 0xFFFF or not 0 <= dst_port <= 0xFFFF:
        raise ValueError("UDP ports are 16 bits")
    ip = bytearray(_IPV4.pack(0x45, tos, total, ident & 0xFFFF, 0x4000 if df else 0, ttl,
                              wire.IPPROTO_UDP, 0, outer_src, outer_dst))
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    udp_len = total - OUTER_IP_HLEN
    check = udp_pseudo_sum(outer_src, outer_dst, udp_len) if udp_csum else 0
    return (bytes(ip) + _UDP.pack(src_port, dst_port, udp_len, check)
            + wire.vxlan_header(vni) + wire.ethernet_header(dst_mac, src_mac))


def udp_pseudo_sum(src: bytes, dst: bytes, udp_len: int) -> int:
    """Folded, not complemented, IPv4 pseudo-header sum for UDP: what a partial checksum holds."""
    return fold_pseudo(int.from_bytes(src + dst, "big") % 0xFFFF + wire.IPPROTO_UDP + udp_len)


def tap_header(tap_mac: bytes, src_mac: bytes) -> bytes:
    """The TAP frame's Ethernet header, to the TAP's own MAC so the stack takes it as ours."""
    return wire.ethernet_header(tap_mac, src_mac)


def pack_tunnel_vnet_hdr(gso_size: int, *, l2_len: int = TAP_L2_LEN, inner_ihl: int = 20,
                         tcp_hlen: int = 20, udp_csum: bool = False, ecn: bool = False) -> bytes:
    """The 24-byte header for ``l2 + prefix + inner IPv4/TCP super-packet``, cut at ``gso_size``.

    ``l2_len`` is what precedes the outer IPv4 header in the write (14 on a TAP).
    """
    if gso_size <= 0:
        raise ValueError("gso_size must be positive (the kernel refuses 0)")
    outer_th = l2_len + OUTER_IP_HLEN
    if outer_th < MIN_OUTER_TH:
        raise ValueError(f"outer_th_offset {outer_th} < {MIN_OUTER_TH}: write to a TAP, not a TUN")
    inner_nh = outer_th + UDP_HLEN + wire.ENCAP_HLEN
    csum_start = inner_nh + inner_ihl
    flags = F_NEEDS_CSUM | (F_UDP_TUNNEL_CSUM if udp_csum else 0)
    gso_type = GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4 | (GSO_ECN if ecn else 0)
    return TNL_VNET_HDR.pack(flags, gso_type, csum_start + tcp_hlen, gso_size, csum_start,
                             TCP_CSUM_OFFSET, 0, 0, 0, 0, outer_th, inner_nh)


def tunnel_vnet_hdr_for(inner: bytes | bytearray | memoryview, gso_size: int, *,
                        off: int = 0, l2_len: int = TAP_L2_LEN,
                        udp_csum: bool = False) -> bytes:
    """:func:`pack_tunnel_vnet_hdr` with header lengths and ECN read from the inner packet."""
    ihl = (inner[off] & 0x0F) << 2
    thl = (inner[off + ihl + 12] >> 4) << 2
    ecn = bool(inner[off + ihl + 13] & 0x80)  # CWR: the kernel then needs GSO_ECN
    return pack_tunnel_vnet_hdr(gso_size, l2_len=l2_len, inner_ihl=ihl, tcp_hlen=thl,
                                udp_csum=udp_csum, ecn=ecn)


def src_port_for(inner: bytes | bytearray | memoryview, off: int = 0) -> int:
    """Outer UDP source port from the inner flow, as the kernel's udp_flow_src_port spreads it."""
    return wire.flow_src_port(wire.flow_hash(inner, off))


def parse_tunnel_vnet_hdr(data: bytes | bytearray | memoryview) -> dict[str, int]:
    """Decode a 24-byte header into its named fields (tests, debugging)."""
    names = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
             "num_buffers", "hash_value", "hash_report", "padding", "outer_th_offset",
             "inner_nh_offset")
    return dict(zip(names, TNL_VNET_HDR.unpack_from(data), strict=True))
