"""One's-complement checksums (RFC 1071), the one home for every helper the dataplane uses.

The trick behind all of them: 2**16 == 1 modulo 0xffff, so the one's-complement
sum of a byte string is ``int.from_bytes(data, "big") % 0xffff`` (with the
0/0xffff fix-up), 4-25x faster in CPython than summing 16-bit words. Folding
the big integer at multiples of 16 bits before the modulo keeps the value and
makes the modulo work on a tenth of the digits.

Pure: functions over buffers and offsets.
"""

from __future__ import annotations

TCP_CSUM_OFFSET = 16  # the checksum field inside a TCP header
UDP_CSUM_OFFSET = 6
# Masks for folding a big integer at multiples of 16 bits (value kept modulo 0xffff):
# four folds bring a 1448-byte segment down to ~90 bytes before the modulo.
FOLD1 = (1 << 5632) - 1
FOLD2 = (1 << 2816) - 1
FOLD3 = (1 << 1408) - 1
FOLD4 = (1 << 704) - 1


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded 16-bit one's complement sum of ``data`` (odd length padded with zero)."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    s = n % 0xFFFF
    return s if s or n == 0 else 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum of ``data``: the complement of its one's complement sum."""
    return ~ones_sum(data) & 0xFFFF


def ipv4_header_checksum_ok(buf: bytes | bytearray | memoryview, off: int, ihl: int) -> bool:
    """True when the IPv4 header at ``off`` (``ihl`` bytes) sums to 0xffff."""
    n = int.from_bytes(buf[off:off + ihl], "big")
    return n != 0 and n % 0xFFFF == 0


def pseudo_header_sum(buf: bytes | bytearray | memoryview, ip_off: int, proto: int,
                      l4_len: int) -> int:
    """The folded (not complemented) IPv4 pseudo-header sum, as a partial checksum holds it."""
    n = int.from_bytes(buf[ip_off + 12:ip_off + 20], "big")  # src and dst: 4 words
    s = (n % 0xFFFF) + proto + l4_len
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return s


def fold_pseudo(s: int) -> int:
    """Fold a pseudo-header sum exactly as :func:`pseudo_header_sum` does."""
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def l4_checksum(buf: bytes | bytearray | memoryview, ip_off: int, ip_len: int) -> int:
    """The full TCP/UDP checksum of the IPv4 packet at ``ip_off`` (field treated as zero)."""
    ihl = (buf[ip_off] & 0x0F) << 2
    proto = buf[ip_off + 9]
    l4 = ip_off + ihl
    l4_len = ip_len - ihl
    pos = l4 + (TCP_CSUM_OFFSET if proto == 6 else UDP_CSUM_OFFSET)
    field = (buf[pos] << 8) | buf[pos + 1]
    n = int.from_bytes(buf[l4:ip_off + ip_len], "big")
    if l4_len & 1:
        n <<= 8
    total = n % 0xFFFF - field + pseudo_header_sum(buf, ip_off, proto, l4_len)
    total %= 0xFFFF
    csum = ~(total or 0xFFFF) & 0xFFFF
    if proto == 17 and csum == 0:
        return 0xFFFF
    return csum


def complete_checksum(buf: bytearray | memoryview, ip_off: int, ip_len: int,
                      csum_start: int, csum_offset: int) -> None:
    """Finish a NEEDS_CSUM checksum: the field holds the pseudo sum; sum from csum_start."""
    start = ip_off + csum_start
    pos = start + csum_offset
    n = int.from_bytes(buf[start:ip_off + ip_len], "big")
    if (ip_off + ip_len - start) & 1:
        n <<= 8
    n = (n >> 5632) + (n & FOLD1)
    n = (n >> 2816) + (n & FOLD2)
    n = (n >> 1408) + (n & FOLD3)
    n = (n >> 704) + (n & FOLD4)
    s = n % 0xFFFF
    csum = ~(s or 0xFFFF) & 0xFFFF
    if csum == 0 and buf[ip_off + 9] == 17:
        csum = 0xFFFF
    buf[pos] = csum >> 8
    buf[pos + 1] = csum & 0xFF
