"""virtio_net_hdr: the 10-byte header in front of every TUN read and write, and its rules.

The TUN is opened with ``IFF_VNET_HDR``, so every read and write carries a
10-byte ``virtio_net_hdr`` (native byte order) in front of the IP packet. That
header is how the engine copes with two things a kernel VXLAN peer sends
across veth (docs/architecture.md, "Dataplane"):

- inner TCP/UDP checksums left *partial* (the field holds only the
  pseudo-header sum): written with ``NEEDS_CSUM`` the kernel completes or
  trusts them exactly as it would have; written plain they are dropped;
- unsegmented TCP datagrams of up to ~64 KB: written with a ``GSO_TCPV4``
  header the kernel segments them; written plain, forwarding drops them.

Pure: functions over buffers and offsets, no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dataplane.csum import TCP_CSUM_OFFSET, UDP_CSUM_OFFSET, pseudo_header_sum

VNET_HDR_LEN = 10
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

# What fill_rx_vnet_hdr decided (engine counters).
RX_PLAIN = 0
RX_CSUM_PARTIAL = 1
RX_GSO = 2

_ZERO_HDR = bytes(VNET_HDR_LEN)


@dataclass(frozen=True, slots=True)
class VnetHdr:
    """A decoded virtio_net_hdr."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                             self.csum_start, self.csum_offset)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> VnetHdr:
        return cls(*VNET_HDR.unpack_from(data))


def fill_rx_vnet_hdr(buf: bytearray | memoryview, hdr_off: int, ip_off: int, ip_len: int,
                     mtu: int) -> int:
    """Write the virtio_net_hdr for a packet received from a peer; return RX_* for stats.

    ``buf[ip_off:ip_off+ip_len]`` is a checked IPv4 packet (wire.check_ipv4);
    the header goes to ``buf[hdr_off:hdr_off+10]``. Rules (what a kernel peer sends):
    an unfragmented TCP packet above ``mtu`` gets a GSO_TCPV4 header (its
    checksum field reset to the pseudo-header sum); a TCP/UDP packet whose
    checksum field equals the pseudo-header sum gets NEEDS_CSUM; anything else
    a zero header, so the kernel verifies it.
    """
    proto = buf[ip_off + 9]
    if (proto != 6 and proto != 17) or (buf[ip_off + 6] & 0x3F) | buf[ip_off + 7]:
        buf[hdr_off:hdr_off + VNET_HDR_LEN] = _ZERO_HDR
        return RX_PLAIN
    ihl = (buf[ip_off] & 0x0F) << 2
    l4_len = ip_len - ihl
    if proto == 6:
        if l4_len < 20:
            buf[hdr_off:hdr_off + VNET_HDR_LEN] = _ZERO_HDR
            return RX_PLAIN
        csum_off = TCP_CSUM_OFFSET
    else:
        if l4_len < 8:
            buf[hdr_off:hdr_off + VNET_HDR_LEN] = _ZERO_HDR
            return RX_PLAIN
        csum_off = UDP_CSUM_OFFSET
    pos = ip_off + ihl + csum_off
    field = (buf[pos] << 8) | buf[pos + 1]
    pseudo = pseudo_header_sum(buf, ip_off, proto, l4_len)
    if proto == 6 and ip_len > mtu:
        thl = (buf[ip_off + ihl + 12] >> 4) << 2
        gso_type = GSO_TCPV4 | (GSO_ECN if buf[ip_off + ihl + 13] & 0x80 else 0)
        if field != pseudo:
            buf[pos] = pseudo >> 8
            buf[pos + 1] = pseudo & 0xFF
        VNET_HDR.pack_into(buf, hdr_off, F_NEEDS_CSUM, gso_type, ihl + thl,
                           mtu - ihl - thl, ihl, TCP_CSUM_OFFSET)
        return RX_GSO
    if field == pseudo or (pseudo == 0xFFFF and field == 0 and proto == 6):
        VNET_HDR.pack_into(buf, hdr_off, F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, csum_off)
        return RX_CSUM_PARTIAL
    buf[hdr_off:hdr_off + VNET_HDR_LEN] = _ZERO_HDR
    return RX_PLAIN
