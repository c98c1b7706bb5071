"""Userspace GRO: consecutive segments of one flow -> one GSO TUN write (TCP or UDP).

Pure: the coalescer only fills its own buffer; the engine writes what
:meth:`Coalescer.finish` returns.
"""

from __future__ import annotations

from dataplane.csum import TCP_CSUM_OFFSET, UDP_CSUM_OFFSET, internet_checksum, pseudo_header_sum
from dataplane.vnet import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_UDP_L4,
    VNET_HDR,
    VNET_HDR_LEN,
    fill_rx_vnet_hdr,
)

_GRO_MAX = 65535
_UDP_SEGS = 64  # datagrams per UDP GSO write (the kernel's limit is at least this)
_IP20 = (1 << 160) - 1
_MASKS: dict[int, int] = {}


def _header_mask(hl: int) -> int:
    """Ones over VXLAN + Ethernet + IPv4 + TCP header (``22 + hl`` bytes), except the
    bytes that differ between segments of one flow: IPv4 id and checksum, TCP seq
    and checksum."""
    mask = _MASKS.get(hl)
    if mask is None:
        n = 22 + hl
        m = bytearray(b"\xff" * n)
        for lo, hi in ((26, 28), (32, 34), (46, 50), (58, 60)):
            m[lo:hi] = bytes(hi - lo)
        mask = _MASKS[hl] = int.from_bytes(m, "big")
    return mask


class Coalescer:
    """Merges consecutive TCP segments (or UDP datagrams) of one flow into one GSO TUN write.

    The segments arrive in one UDP GRO batch; merging them lets one TUN write
    carry ~64 KB instead of one MSS. A segment may join when it continues the
    held flow exactly (same addresses, ports, ACK number, header length and
    options, next sequence number, only ACK/PSH set, no larger than the first
    segment, the previous one full-size). PSH closes the packet. The merged
    packet goes out with the pseudo-header sum and NEEDS_CSUM, as kernel GRO does.

    UDP (:meth:`can_hold`): consecutive unfragmented datagrams of one flow (same
    addresses, ports, TOS, TTL, DF) with equal payloads, the last possibly shorter,
    up to 64 of them, become one ``GSO_UDP_L4`` write; the kernel cuts it back into
    the same datagrams (IPv4 ids renumbered from the first). Like TCP, the merged
    packet's checksums are computed by the kernel, so the datagrams' own are not
    verified (the TUN would otherwise verify each). ``udp = False`` turns UDP off
    (a kernel whose TUN refuses UDP GSO writes).
    Pure: it only fills its own buffer; the engine writes :meth:`finish`'s view.
    """

    def __init__(self) -> None:
        self.buf = bytearray(VNET_HDR_LEN + _GRO_MAX + 64)
        self.view = memoryview(self.buf)
        self.ip_len = 0  # 0: nothing held
        self.count = 0
        self.mss = 0
        self.hl = 0
        self.ihl = 0
        self.next_seq = 0
        self.closed = False
        self.proto = 6  # of the held packet
        self.udp = True  # merge UDP datagrams too

    def can_hold(self, buf: bytearray | memoryview, off: int, ip_len: int, mtu: int) -> bool:
        """True for a TCP segment (:meth:`can_start`) or a UDP datagram worth holding."""
        proto = buf[off + 9]
        if proto == 6:
            return self.can_start(buf, off, ip_len, mtu)
        return (proto == 17 and self.udp and not (buf[off + 6] & 0x3F) | buf[off + 7]
                and ip_len <= mtu and ip_len > ((buf[off] & 0x0F) << 2) + 8)

    @staticmethod
    def can_start(buf: bytearray | memoryview, off: int, ip_len: int, mtu: int) -> bool:
        """True for a plain ACK(+PSH) TCP data segment that is worth holding."""
        if buf[off + 9] != 6 or (buf[off + 6] & 0x3F) | buf[off + 7] or ip_len > mtu:
            return False
        ihl = (buf[off] & 0x0F) << 2
        t = off + ihl
        if ihl + 20 > ip_len:
            return False
        thl = (buf[t + 12] >> 4) << 2
        return (thl >= 20 and buf[t + 13] & ~0x08 == 0x10 and ip_len > ihl + thl
                and buf[t + 13] & 0x08 == 0)

    def start(self, buf: bytearray | memoryview, off: int, ip_len: int) -> None:
        """Hold this segment (can_start or can_hold was True)."""
        b = self.buf
        b[VNET_HDR_LEN:VNET_HDR_LEN + ip_len] = buf[off:off + ip_len]
        ihl = (buf[off] & 0x0F) << 2
        self.proto = buf[off + 9]
        if self.proto == 17:
            self.ip_len, self.count, self.ihl, self.hl = ip_len, 1, ihl, ihl + 8
            self.mss = ip_len - ihl - 8
            self.closed = False
            return
        hl = ihl + ((buf[off + ihl + 12] >> 4) << 2)
        self.ip_len, self.count, self.ihl, self.hl = ip_len, 1, ihl, hl
        self.mss = ip_len - hl
        self.next_seq = (int.from_bytes(buf[off + ihl + 4:off + ihl + 8], "big") + self.mss
                         ) & 0xFFFFFFFF
        self.closed = False

    def append(self, buf: bytearray | memoryview, off: int, ip_len: int) -> bool:
        """Add this segment to the held packet if it continues it; False if not."""
        if self.closed:
            return False
        if self.proto == 17:
            return self._append_udp(buf, off, ip_len)
        b, h, ihl, hl = self.buf, VNET_HDR_LEN, self.ihl, self.hl
        if buf[off + 9] != 6 or (buf[off] & 0x0F) << 2 != ihl or (buf[off + 6] & 0x3F) | buf[
                off + 7]:
            return False
        if ip_len <= hl:  # no payload (or a header cut short): nothing to merge
            return False
        t = off + ihl
        if (buf[t + 12] >> 4) << 2 != hl - ihl:
            return False
        pay = ip_len - hl
        if pay <= 0 or pay > self.mss or self.ip_len + pay > _GRO_MAX:
            return False
        if buf[t + 13] & ~0x08 != 0x10:
            return False
        if int.from_bytes(buf[t + 4:t + 8], "big") != self.next_seq:
            return False
        ht = h + ihl
        if (buf[off + 12:off + 20] != b[h + 12:h + 20] or buf[t:t + 4] != b[ht:ht + 4]
                or buf[t + 8:t + 12] != b[ht + 8:ht + 12]
                or buf[t + 20:off + hl] != b[ht + 20:h + hl]
                or buf[off + 1] != b[h + 1] or buf[off + 8] != b[h + 8]):
            return False
        end = h + self.ip_len
        b[end:end + pay] = buf[off + hl:off + ip_len]
        self.ip_len += pay
        self.count += 1
        self.next_seq = (self.next_seq + pay) & 0xFFFFFFFF
        if buf[t + 13] & 0x08:
            b[ht + 13] |= 0x08
            self.closed = True
        elif pay < self.mss:
            self.closed = True
        return True

    def _append_udp(self, buf: bytearray | memoryview, off: int, ip_len: int) -> bool:
        b, h, ihl = self.buf, VNET_HDR_LEN, self.ihl
        if (buf[off + 9] != 17 or (buf[off] & 0x0F) << 2 != ihl or (buf[off + 6] & 0x3F)
                | buf[off + 7] or self.count >= _UDP_SEGS):
            return False
        pay = ip_len - ihl - 8
        if pay <= 0 or pay > self.mss or self.ip_len + pay > _GRO_MAX:
            return False
        t, ht = off + ihl, h + ihl
        if (buf[off + 12:off + 20] != b[h + 12:h + 20] or buf[t:t + 4] != b[ht:ht + 4]
                or buf[off + 1] != b[h + 1] or buf[off + 8] != b[h + 8]
                or (buf[off + 6] ^ b[h + 6]) & 0x40):
            return False
        end = h + self.ip_len
        b[end:end + pay] = buf[t + 8:off + ip_len]
        self.ip_len += pay
        self.count += 1
        if pay < self.mss:
            self.closed = True
        return True

    def extend(self, buf: memoryview, off: int, n: int, step: int, prefix: bytes
               ) -> tuple[int, int, int]:
        """Absorb the datagrams of one UDP GRO batch that continue the held packet.

        ``buf[off:n]`` holds VXLAN datagrams of ``step`` bytes (the last may be
        shorter), all from the sender of the frame that started the packet, whose
        22-byte VXLAN + Ethernet header was ``prefix``. A datagram is taken only if
        it is as long as the first segment, its IPv4 header checksum is right, its
        sequence number is the next one, and all its other header bytes (VXLAN,
        Ethernet, IPv4, TCP with options and flags) equal the first segment's,
        except the IPv4 id and the two checksums. Such a datagram would pass
        wire.check_frame too; here the whole header is one integer compared under a
        mask, instead of a dozen slices. Stops at the first other datagram (the
        engine takes that one the long way). Returns (offset reached, datagrams
        taken, their inner IP bytes).
        """
        ip_len = self.ip_len
        if (self.closed or not ip_len or self.ihl != 20 or self.proto != 6
                or step != 22 + self.hl + self.mss):
            return off, 0, 0
        b, hl, h = self.buf, self.hl, VNET_HDR_LEN
        hlen = 22 + hl
        mask = _header_mask(hl)
        from_bytes = int.from_bytes
        want = from_bytes(prefix + b[h:h + hl], "big") & mask
        seq_shift = (hlen - 50) * 8  # TCP seq: bytes 46..50
        ip_shift = (hlen - 42) * 8  # IPv4 header: bytes 22..42
        mss = self.mss
        full = 22 + hl + mss
        end = h + ip_len
        seq = self.next_seq
        taken = 0
        while off + full <= n and end - h + mss <= _GRO_MAX:
            x = from_bytes(buf[off:off + hlen], "big")
            if (x & mask != want or (x >> seq_shift) & 0xFFFFFFFF != seq
                    or ((x >> ip_shift) & _IP20) % 0xFFFF):
                break
            b[end:end + mss] = buf[off + hlen:off + full]
            end += mss
            seq = (seq + mss) & 0xFFFFFFFF
            taken += 1
            off += step
        self.ip_len = end - h
        self.count += taken
        self.next_seq = seq
        return off, taken, taken * (hl + mss)

    def finish(self, mtu: int) -> memoryview:
        """The held packet with its vnet header in front, ready for one TUN write; resets."""
        b, h, ip_len = self.buf, VNET_HDR_LEN, self.ip_len
        if self.count == 1:
            fill_rx_vnet_hdr(b, 0, h, ip_len, mtu)
        elif self.proto == 17:
            ihl = self.ihl
            ulen = ip_len - ihl
            b[h + 2:h + 4] = ip_len.to_bytes(2, "big")
            b[h + 10:h + 12] = b"\0\0"
            b[h + 10:h + 12] = internet_checksum(b[h:h + ihl]).to_bytes(2, "big")
            u = h + ihl
            b[u + 4:u + 6] = ulen.to_bytes(2, "big")
            b[u + 6:u + 8] = pseudo_header_sum(b, h, 17, ulen).to_bytes(2, "big")
            VNET_HDR.pack_into(b, 0, F_NEEDS_CSUM, GSO_UDP_L4, ihl + 8, self.mss, ihl,
                               UDP_CSUM_OFFSET)
        else:
            ihl = self.ihl
            b[h + 2] = ip_len >> 8
            b[h + 3] = ip_len & 0xFF
            b[h + 10] = 0
            b[h + 11] = 0
            n = int.from_bytes(b[h:h + ihl], "big") % 0xFFFF
            c = ~(n or 0xFFFF) & 0xFFFF
            b[h + 10] = c >> 8
            b[h + 11] = c & 0xFF
            pseudo = pseudo_header_sum(b, h, 6, ip_len - ihl)
            pos = h + ihl + TCP_CSUM_OFFSET
            b[pos] = pseudo >> 8
            b[pos + 1] = pseudo & 0xFF
            VNET_HDR.pack_into(b, 0, F_NEEDS_CSUM, GSO_TCPV4, self.hl, self.mss, ihl,
                               TCP_CSUM_OFFSET)
        self.ip_len = 0
        self.count = 0
        return self.view[:h + ip_len]
