"""TSO split: one TCP/IPv4 super-packet from the TUN -> MSS segments ready for UDP GSO.

The kernel's segmentation, done in Python because the segments must be
wrapped in VXLAN before they leave: per segment IPv4 id + i, total length and
header checksum; TCP seq + offset; FIN/PSH only on the last, CWR only on the
first; a full TCP checksum for kernel receivers, or the pseudo-header sum
only for flannelette receivers (see :attr:`dataplane.fib.Peer.partial_csum`).

Pure: functions over buffers and offsets.
"""

from __future__ import annotations

import struct

from dataplane.csum import FOLD1, FOLD2, FOLD3, FOLD4, fold_pseudo


def tso_split(src: bytearray | memoryview, ip_off: int, ip_len: int, gso_size: int,
              out: bytearray | memoryview, prefix: bytes,
              partial: bool = False) -> tuple[int, int, int]:
    """Segment the TCP/IPv4 super-packet ``src[ip_off:ip_off+ip_len]`` into ``out``.

    Each segment is written as ``prefix`` (the 22-byte VXLAN + Ethernet header)
    + IPv4 + TCP + at most ``gso_size`` payload bytes, back to back, so ``out``
    is ready for one UDP GSO send with segment size ``seglen``. Per segment:
    IPv4 id + i, total length and header checksum; TCP seq + offset; FIN/PSH only
    on the last, CWR only on the first; a full TCP checksum (the receiver may be
    a kernel), or with ``partial`` only the pseudo-header sum (what a kernel sender
    leaves across veth), for a flannelette receiver that completes it with
    NEEDS_CSUM: the payload is then copied but never summed.
    Returns (bytes used, segments, seglen of the full-size segments).
    """
    if not isinstance(src, memoryview):
        src = memoryview(src)  # payload slices without a temporary copy
    ihl = (src[ip_off] & 0x0F) << 2
    if ihl == 20:
        return _tso_split_fast(src, ip_off, ip_len, gso_size, out, prefix, partial)
    thl = (src[ip_off + ihl + 12] >> 4) << 2
    hl = ihl + thl
    plen = len(prefix)
    hdr = bytes(src[ip_off:ip_off + hl])
    ident = (hdr[4] << 8) | hdr[5]
    seq = int.from_bytes(hdr[ihl + 4:ihl + 8], "big")
    flags = hdr[ihl + 13]
    addr_sum = int.from_bytes(hdr[12:20], "big") % 0xFFFF + 6
    pos = 0
    i = 0
    off = hl
    while off < ip_len:
        seg = min(gso_size, ip_len - off)
        last = off + seg >= ip_len
        o = pos + plen
        out[pos:o] = prefix
        out[o:o + hl] = hdr
        tot = hl + seg
        out[o + 2] = tot >> 8
        out[o + 3] = tot & 0xFF
        idn = (ident + i) & 0xFFFF
        out[o + 4] = idn >> 8
        out[o + 5] = idn & 0xFF
        out[o + 10] = 0
        out[o + 11] = 0
        n = int.from_bytes(out[o:o + ihl], "big") % 0xFFFF
        c = ~(n or 0xFFFF) & 0xFFFF
        out[o + 10] = c >> 8
        out[o + 11] = c & 0xFF
        t = o + ihl
        out[t + 4:t + 8] = ((seq + off - hl) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if not last:
            f &= ~0x09  # FIN, PSH
        if i:
            f &= ~0x80  # CWR
        out[t + 13] = f
        out[t + 16] = 0
        out[t + 17] = 0
        out[o + hl:o + tot] = src[ip_off + off:ip_off + off + seg]
        if partial:
            c = fold_pseudo(addr_sum + tot - ihl)
        else:
            n = int.from_bytes(out[t:o + tot], "big")
            if (tot - ihl) & 1:
                n <<= 8
            s = (n % 0xFFFF + addr_sum + tot - ihl) % 0xFFFF
            c = ~(s or 0xFFFF) & 0xFFFF
        out[t + 16] = c >> 8
        out[t + 17] = c & 0xFF
        pos = o + tot
        off += seg
        i += 1
    return pos, i, plen + hl + gso_size


_IP_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")  # IPv4 without options + fixed TCP header


def _tso_split_fast(src: memoryview, ip_off: int, ip_len: int, gso_size: int,
                    out: bytearray | memoryview, prefix: bytes,
                    partial: bool) -> tuple[int, int, int]:
    """tso_split for the usual IHL 20: one pack_into per segment, checksums by parts.

    The sums of the header words that never change are taken once; per segment only
    the total length, id, sequence number, flags and the payload are added in.
    """
    (vihl, tos, _, ident, frag, ttl, proto, _, saddr, daddr, sport, dport, seq, ack, doff,
     flags, win, _, urg) = _IP_TCP.unpack_from(src, ip_off)
    thl = (doff >> 4) << 2
    hl = 20 + thl
    opts = bytes(src[ip_off + 40:ip_off + hl])
    addrs = int.from_bytes(saddr + daddr, "big")
    ip_base = ((vihl << 8) + tos + frag + (ttl << 8) + proto + addrs) % 0xFFFF
    tcp_base = (sport + dport + (ack >> 16) + (ack & 0xFFFF) + win + urg
                + (int.from_bytes(opts, "big") if opts else 0) + addrs + 6 - 20) % 0xFFFF
    plen = len(prefix)
    seglen = plen + hl + gso_size
    pack = _IP_TCP.pack_into
    if partial:
        return _tso_split_partial(src, ip_off, ip_len, gso_size, out, prefix, hl, opts, addrs,
                                  ip_base)
    from_bytes = int.from_bytes
    pos = 0
    i = 0
    off = ip_off + hl
    end = ip_off + ip_len
    while off < end:
        seg = gso_size if off + gso_size < end else end - off
        tot = hl + seg
        idn = (ident + i) & 0xFFFF
        seqv = (seq + off - ip_off - hl) & 0xFFFFFFFF
        f = flags
        if off + seg < end:
            f &= ~0x09  # FIN, PSH only on the last
        if i:
            f &= ~0x80  # CWR only on the first
        chunk = src[off:off + seg]
        n = from_bytes(chunk, "big")
        if seg & 1:
            n <<= 8
        # Folding at multiples of 16 bits keeps the value modulo 0xffff and makes the
        # final modulo work on a tenth of the digits (measured ~1.8x faster).
        n = (n >> 5632) + (n & FOLD1)
        n = (n >> 2816) + (n & FOLD2)
        n = (n >> 1408) + (n & FOLD3)
        n = (n >> 704) + (n & FOLD4)
        t = (n + tcp_base + (seqv >> 16) + (seqv & 0xFFFF) + (doff << 8) + f + tot) % 0xFFFF
        c = (ip_base + tot + idn) % 0xFFFF
        o = pos + plen
        out[pos:o] = prefix
        pack(out, o, vihl, tos, tot, idn, frag, ttl, proto, ~(c or 0xFFFF) & 0xFFFF, saddr,
             daddr, sport, dport, seqv, ack, doff, f, win, ~(t or 0xFFFF) & 0xFFFF, urg)
        if opts:
            out[o + 40:o + hl] = opts
        out[o + hl:o + tot] = chunk
        pos = o + tot
        off += seg
        i += 1
    return pos, i, seglen


def _tso_split_partial(src: memoryview, ip_off: int, ip_len: int, gso_size: int,
                       out: bytearray | memoryview, prefix: bytes, hl: int, opts: bytes,
                       addrs: int, ip_base: int) -> tuple[int, int, int]:
    """_tso_split_fast for a flannelette receiver: TCP checksum = pseudo-header sum.

    Nothing is summed over the payload: the checksum field of every full-size
    segment holds the same pseudo sum, only the last one's length differs.
    """
    (vihl, tos, _, ident, frag, ttl, proto, _, saddr, daddr, sport, dport, seq, ack, doff,
     flags, win, _, urg) = _IP_TCP.unpack_from(src, ip_off)
    addr_sum = addrs % 0xFFFF + 6
    plen = len(prefix)
    seglen = plen + hl + gso_size
    pack = _IP_TCP.pack_into
    pos = 0
    i = 0
    off = ip_off + hl
    end = ip_off + ip_len
    full_pseudo = fold_pseudo(addr_sum + hl - 20 + gso_size)
    mid = flags & ~0x89  # FIN, PSH only on the last; CWR only on the first
    while off < end:
        last = off + gso_size >= end
        seg = end - off if last else gso_size
        tot = hl + seg
        idn = (ident + i) & 0xFFFF
        f = flags if last and not i else (
            (flags & ~0x80) if last else (flags & ~0x09 if not i else mid))
        c = (ip_base + tot + idn) % 0xFFFF
        o = pos + plen
        out[pos:o] = prefix
        pack(out, o, vihl, tos, tot, idn, frag, ttl, proto, ~(c or 0xFFFF) & 0xFFFF, saddr,
             daddr, sport, dport, (seq + off - ip_off - hl) & 0xFFFFFFFF, ack, doff, f, win,
             fold_pseudo(addr_sum + tot - 20) if last else full_pseudo, urg)
        if opts:
            out[o + 40:o + hl] = opts
        out[o + hl:o + tot] = src[off:off + seg]
        pos = o + tot
        off += seg
        i += 1
    return pos, i, seglen
