"""The VXLAN wire codec: what the Linux kernel sends and accepts, as pure functions.

A VXLAN datagram (UDP payload) as the engine sees it::

    0        8               14              20     22
    | VXLAN  | Ethernet dst  | Ethernet src  | type | IPv4 packet or ARP ...

The VXLAN header is ``08 00 00 00 | VNI (24 bits) | 00``; the kernel drops any
other flag or reserved bit, and so do we. The inner Ethernet header carries the
receiver's VtepMAC as destination and the sender's as source.

Everything here works on ``bytes``/``bytearray`` and offsets, so the engine can
run the checks in place on its receive buffers. A frame that is wrong in any
way maps to one :class:`DropReason`; nothing here raises on packet input.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

from dataplane.csum import internet_checksum, ipv4_header_checksum_ok
from dataplane.errors import ConfigError

VXLAN_PORT = 8472  # flannel's (and the Linux kernel's) default; IANA's is 4789
VXLAN_HLEN = 8
ETH_HLEN = 14
ENCAP_HLEN = VXLAN_HLEN + ETH_HLEN  # 22: bytes in front of the inner IP packet
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6
VXLAN_FLAGS = b"\x08\x00\x00\x00"  # the I flag; every other flag/reserved bit zero
# Outer UDP destination overhead: outer IPv4 20 + UDP 8 + VXLAN 8 + Ethernet 14.
OVERHEAD = 50
SRC_PORT_MIN = 32768  # the kernel's default ip_local_port_range
SRC_PORT_MAX = 60999
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

# Offsets inside a VXLAN datagram.
OFF_VNI = 4
OFF_ETH_DST = VXLAN_HLEN
OFF_ETH_SRC = VXLAN_HLEN + 6
OFF_ETHERTYPE = VXLAN_HLEN + 12
OFF_IP = ENCAP_HLEN


class DropReason(enum.Enum):
    """Every way a frame or packet can be refused; the value is the counter's name."""

    # received from the UDP socket
    TRUNCATED = "truncated"  # shorter than the headers it claims
    BAD_FLAGS = "bad_flags"  # VXLAN flag/reserved bits other than 08 00 00 00 .. 00
    WRONG_VNI = "wrong_vni"  # a VNI we do not serve
    UNKNOWN_PEER = "unknown_peer"  # outer source address is no peer's PublicIP
    SPOOFED_INNER_SOURCE = "spoofed_inner_source"  # inner IPv4 source outside the peer's subnet
    OWN_MAC_SOURCE = "own_mac_source"  # inner source MAC is ours (a loop)
    NOT_FOR_US = "not_for_our_mac"  # inner destination MAC is not our VtepMAC
    NOT_IPV4 = "not_ipv4"  # an EtherType (or TUN packet) we do not carry
    BAD_IPV4_HEADER = "bad_ipv4_header"  # version, IHL, total length or header checksum
    TTL_EXPIRED = "ttl_expired"  # inner TTL 0: no router may emit that
    OVERSIZE = "oversize"  # above the MTU and not a TCP packet the kernel can segment
    BAD_ARP = "bad_arp"  # not an ARP request/reply for IPv4 over Ethernet
    ARP_IGNORED = "arp_ignored"  # an ARP reply, or a request for an address not ours
    # read from the TUN device or failing on output
    NO_ROUTE = "no_route"  # no peer owns the destination (ICMP unreachable sent back)
    UNSUPPORTED_GSO = "unsupported_gso"  # a TUN super-packet we cannot segment (not TCPv4)
    SEND_FAILED = "send_failed"  # sendto() refused the datagram
    TUN_WRITE_FAILED = "tun_write_failed"  # the TUN refused the packet
    # failing system calls (the packet, if any, is lost; the loop goes on)
    TUN_READ_FAILED = "tun_read_failed"  # read() on the TUN failed (not EAGAIN)
    UDP_RECV_FAILED = "udp_recv_failed"  # recvmsg() on the UDP socket failed (not EAGAIN)


# Reasons check_frame gives a datagram sent to the engine's UDP port (the engine adds
# spoofed_inner_source: a peer's datagram whose inner source is outside its subnet).
RX_REASONS = frozenset(
    {
        DropReason.TRUNCATED, DropReason.BAD_FLAGS, DropReason.WRONG_VNI,
        DropReason.UNKNOWN_PEER, DropReason.OWN_MAC_SOURCE, DropReason.NOT_FOR_US,
        DropReason.NOT_IPV4, DropReason.BAD_IPV4_HEADER, DropReason.TTL_EXPIRED,
        DropReason.OVERSIZE, DropReason.BAD_ARP, DropReason.ARP_IGNORED,
    }
)


class Frame(enum.Enum):
    """What a valid received frame carries."""

    IPV4 = "ipv4"
    ARP = "arp"


# ---- MAC addresses ----------------------------------------------------------------------

def random_vtep_mac(seed: bytes | None = None) -> bytes:
    """A random locally administered unicast MAC, made the way flannel makes VtepMAC."""
    b = bytearray(seed if seed is not None else os.urandom(6))
    if len(b) != 6:
        raise ConfigError(f"a MAC seed must be 6 bytes, got {len(b)}")
    b[0] = (b[0] & 0xFE) | 0x02
    return bytes(b)


def mac_to_str(mac: bytes) -> str:
    """Lower case, colon separated: the form flannel writes into leases."""
    return ":".join(f"{x:02x}" for x in mac)


def mac_from_str(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (either case; ``-`` accepted); ConfigError if malformed."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ConfigError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"not a MAC address: {text!r}") from None


# ---- VXLAN and Ethernet -----------------------------------------------------------------

def vxlan_header(vni: int) -> bytes:
    """The 8-byte VXLAN header the kernel sends for ``vni``."""
    if not 0 <= vni < 1 << 24:
        raise ConfigError(f"VNI must be in 0..16777215, got {vni}")
    return VXLAN_FLAGS + vni.to_bytes(3, "big") + b"\x00"


def parse_vxlan_header(data: bytes | bytearray | memoryview) -> int | DropReason:
    """The VNI of a VXLAN header, or why the kernel would drop it."""
    if len(data) < VXLAN_HLEN:
        return DropReason.TRUNCATED
    if data[0:4] != VXLAN_FLAGS or data[7] != 0:
        return DropReason.BAD_FLAGS
    return int.from_bytes(data[4:7], "big")


def ethernet_header(dst: bytes, src: bytes, ethertype: int = ETH_P_IP) -> bytes:
    """A 14-byte Ethernet header."""
    return dst + src + ethertype.to_bytes(2, "big")


def build_frame(vni: int, dst_mac: bytes, src_mac: bytes, payload: bytes,
                ethertype: int = ETH_P_IP) -> bytes:
    """A whole VXLAN datagram (UDP payload): VXLAN + Ethernet + payload."""
    return vxlan_header(vni) + ethernet_header(dst_mac, src_mac, ethertype) + payload


def check_frame(buf: bytes | bytearray | memoryview, n: int, vxlan_hdr: bytes,
                own_mac: bytes, mtu: int, peer_known: bool) -> Frame | DropReason:
    """Validate a received VXLAN datagram ``buf[:n]`` in place.

    ``vxlan_hdr`` is our own header (flags + VNI); ``peer_known`` says whether the
    outer source address is a peer's PublicIP. The order follows the kernel: VXLAN
    header, then device (VNI), then the inner frame.
    """
    if n < ENCAP_HLEN:
        return DropReason.TRUNCATED
    if buf[0:4] != VXLAN_FLAGS or buf[7] != 0:
        return DropReason.BAD_FLAGS
    if buf[4:7] != vxlan_hdr[4:7]:
        return DropReason.WRONG_VNI
    if not peer_known:
        return DropReason.UNKNOWN_PEER
    if buf[OFF_ETH_SRC:OFF_ETHERTYPE] == own_mac:
        return DropReason.OWN_MAC_SOURCE
    ethertype = (buf[OFF_ETHERTYPE] << 8) | buf[OFF_ETHERTYPE + 1]
    dst = buf[OFF_ETH_DST:OFF_ETH_SRC]
    if ethertype == ETH_P_ARP:
        if dst != own_mac and dst != BROADCAST_MAC:
            return DropReason.NOT_FOR_US
        return Frame.ARP
    if dst != own_mac:
        return DropReason.NOT_FOR_US
    if ethertype != ETH_P_IP:
        return DropReason.NOT_IPV4
    if n < OFF_IP + 20:
        return DropReason.TRUNCATED
    return check_ipv4(buf, OFF_IP, n - OFF_IP, mtu)


def check_ipv4(buf: bytes | bytearray | memoryview, off: int, avail: int,
               mtu: int) -> Frame | DropReason:
    """Check the IPv4 packet at ``off`` with ``avail`` bytes behind it (padding allowed).

    A packet above ``mtu`` passes only if it is an unfragmented TCP packet: the
    kernel's segmentation offload legitimately sends those (see vnet.py).
    """
    if avail < 20:
        return DropReason.TRUNCATED
    b0 = buf[off]
    ihl = (b0 & 0x0F) << 2
    if b0 >> 4 != 4 or ihl < 20:
        return DropReason.BAD_IPV4_HEADER
    total = (buf[off + 2] << 8) | buf[off + 3]
    if total < ihl:
        return DropReason.BAD_IPV4_HEADER
    if total > avail:
        return DropReason.TRUNCATED
    if not ipv4_header_checksum_ok(buf, off, ihl):
        return DropReason.BAD_IPV4_HEADER
    if buf[off + 8] == 0:
        return DropReason.TTL_EXPIRED
    if total > mtu and (buf[off + 9] != IPPROTO_TCP or (buf[off + 6] & 0x3F) | buf[off + 7]):
        return DropReason.OVERSIZE
    return Frame.IPV4


def check_tun_packet(buf: bytes | bytearray | memoryview, off: int, n: int,
                     max_len: int) -> DropReason | None:
    """Check a packet read from the TUN (the kernel built it: only the family can be off)."""
    if n < 20:
        return DropReason.TRUNCATED
    if buf[off] >> 4 != 4:
        return DropReason.NOT_IPV4
    if n > max_len:
        return DropReason.OVERSIZE
    return None


# ---- flow hash -> outer UDP source port -------------------------------------------------

def flow_hash(packet: bytes | bytearray | memoryview, off: int = 0) -> int:
    """A 32-bit hash of the inner flow (addresses, protocol, ports when unfragmented)."""
    proto = packet[off + 9]
    h = zlib.crc32(packet[off + 12:off + 20], proto)
    ihl = (packet[off] & 0x0F) << 2
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and not (
        (packet[off + 6] & 0x3F) | packet[off + 7]
    ):
        h = zlib.crc32(packet[off + ihl:off + ihl + 4], h)
    return h


def flow_lane(packet: bytes | bytearray | memoryview, off: int, lanes: int) -> int:
    """The send lane (1..``lanes``) of the inner flow. The engine's tx loop inlines the
    common case (unfragmented TCP/UDP, 20-byte header: one crc32 over bytes 12..24,
    which equals :func:`flow_hash` there) and calls this for the rest."""
    return 1 + flow_hash(packet, off) % lanes


def flow_src_port(hash32: int, lo: int = SRC_PORT_MIN, hi: int = SRC_PORT_MAX) -> int:
    """Map a flow hash into ``lo..hi`` exactly as the kernel's udp_flow_src_port does."""
    hash32 = (hash32 ^ (hash32 << 16)) & 0xFFFFFFFF
    return ((hash32 * (hi - lo)) >> 32) + lo


# ---- ARP (IPv4 over Ethernet) -----------------------------------------------------------

ARP_REQUEST = 1
ARP_REPLY = 2
ARP_LEN = 28
_ARP = struct.Struct("!HHBBH6s4s6s4s")


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """One ARP request or reply for IPv4 over Ethernet."""

    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    def pack(self) -> bytes:
        return _ARP.pack(1, ETH_P_IP, 6, 4, self.op, self.sha, self.spa, self.tha, self.tpa)


def parse_arp(data: bytes | bytearray | memoryview) -> ArpPacket | DropReason:
    """Decode an ARP body (after the Ethernet header)."""
    if len(data) < ARP_LEN:
        return DropReason.TRUNCATED
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4 or op not in (1, 2):
        return DropReason.BAD_ARP
    return ArpPacket(op, sha, spa, tha, tpa)


def arp_reply_frame(vxlan_hdr: bytes, own_mac: bytes, request: ArpPacket) -> bytes:
    """The VXLAN datagram answering ``request`` with our MAC for the address it asked."""
    reply = ArpPacket(ARP_REPLY, own_mac, request.tpa, request.sha, request.spa)
    return vxlan_hdr + ethernet_header(request.sha, own_mac, ETH_P_ARP) + reply.pack()


def arp_answer(vxlan_hdr: bytes, own_mac: bytes, subnet: ipaddress.IPv4Network,
               body: bytes | bytearray | memoryview) -> bytes | DropReason:
    """Answer an ARP body for an address of ``subnet``, or say why not."""
    arp = parse_arp(body)
    if isinstance(arp, DropReason):
        return arp
    if arp.op != ARP_REQUEST or ipaddress.IPv4Address(arp.tpa) not in subnet:
        return DropReason.ARP_IGNORED
    return arp_reply_frame(vxlan_hdr, own_mac, arp)


# ---- IPv4 and ICMP ----------------------------------------------------------------------

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = 64,
                tos: int = 0, ident: int = 0, flags_frag: int = 0) -> bytes:
    """A 20-byte IPv4 header with a correct checksum."""
    hdr = bytearray(_IPV4.pack(0x45, tos, 20 + payload_len, ident, flags_frag, ttl, proto, 0,
                               src, dst))
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr)


def icmp_unreachable(packet: bytes | bytearray | memoryview, src: bytes,
                     code: int = 1) -> bytes | None:
    """ICMP destination unreachable (default: host unreachable) for ``packet``, from ``src``.

    None when RFC 1122 forbids an error: the packet is itself an ICMP error, a
    non-first fragment, or comes from an unspecified/broadcast/multicast source.
    """
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) << 2
    if ihl < 20 or len(packet) < ihl:
        return None
    orig_src = bytes(packet[12:16])
    if orig_src == b"\x00\x00\x00\x00" or orig_src[0] >= 224 or orig_src == b"\xff" * 4:
        return None
    if ((packet[6] & 0x1F) << 8) | packet[7]:
        return None
    if packet[9] == IPPROTO_ICMP and (len(packet) <= ihl or packet[ihl] in _ICMP_ERRORS):
        return None
    quoted = bytes(packet[:ihl + 8])
    icmp = bytearray(b"\x03" + bytes([code]) + b"\x00\x00\x00\x00\x00\x00" + quoted)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    return ipv4_header(src, orig_src, IPPROTO_ICMP, len(icmp), tos=0xC0) + bytes(icmp)
