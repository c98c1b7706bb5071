"""Tap and flight-recorder records as pcapng frames and JSON (pure; no scapy).

An outer record holds the VXLAN datagram (UDP payload) and its addresses and
ports; :func:`outer_frame` puts real Ethernet/IPv4/UDP headers around it, so
the "outer" interface (LINKTYPE_ETHERNET) shows what crossed the wire (the
underlay MACs are not known to the engine: both are 00:00:00:00:00:00; a
received datagram's source port is not kept by the engine: 0). Inner records
are the IPv4 packets as the TUN gave or took them (LINKTYPE_RAW, interface
"inner"). Every packet carries its verdict as a comment, and the inner and
outer record of one packet share ``epb_packetid``.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from typing import IO, Any

from dataplane.pcapng import (
    DIRECTION_INBOUND,
    DIRECTION_OUTBOUND,
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    VXLAN_DECODE_HINT,
    PcapngWriter,
)
from dataplane.recorder import DropRecord
from dataplane.tap import TapRecord
from dataplane.wire import VXLAN_PORT

OUTER_HLEN = 14 + 20 + 8  # Ethernet + IPv4 + UDP in front of the VXLAN datagram
VXLAN_ETH = 22  # VXLAN header + inner Ethernet in front of the inner IPv4 packet
TRACE_SNAP = 256  # bytes of each side a trace line carries (headers are enough)
_BT_ISB = 5
_ISB_IFDROP = 5


def _csum(data: bytes) -> int:
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def outer_frame(payload: bytes, src: str, dst: str, sport: int, dport: int,
                ttl: int = 64) -> bytes:
    """Ethernet + IPv4 + UDP (checksum 0, allowed for IPv4) around a VXLAN datagram."""
    total = min(20 + 8 + len(payload), 0xFFFF)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, ttl, 17, 0,
                     ipaddress.IPv4Address(src or "0.0.0.0").packed,
                     ipaddress.IPv4Address(dst or "0.0.0.0").packed)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport & 0xFFFF, dport & 0xFFFF, min(8 + len(payload), 0xFFFF), 0)
    return bytes(12) + b"\x08\x00" + ip + udp + payload


def inner_of(datagram: bytes) -> bytes | None:
    """The inner IPv4 packet of a VXLAN datagram, if it plausibly carries one."""
    if len(datagram) >= VXLAN_ETH + 20 and datagram[20:22] == b"\x08\x00" and (
            datagram[VXLAN_ETH] >> 4) == 4:
        return datagram[VXLAN_ETH:]
    return None


def _direction(direction: str) -> int:
    return DIRECTION_OUTBOUND if direction == "tx" else DIRECTION_INBOUND


class CaptureFile:
    """A pcapng stream of tap (and flight-recorder) records for one side or both."""

    def __init__(self, stream: IO[bytes], side: str = "both", *, flush: bool = False,
                 port: int = VXLAN_PORT, comment: str | None = None) -> None:
        comments = [VXLAN_DECODE_HINT] + ([comment] if comment else [])
        self.stream = stream
        self.writer = PcapngWriter(stream, flush=flush, comments=comments)
        self.side = side
        self.outer = self.inner = -1
        if side in ("outer", "both"):
            self.outer = self.writer.add_interface(
                LINKTYPE_ETHERNET, "outer",
                description=f"VXLAN datagrams as sent/received on UDP {port} (underlay MACs "
                            f"not known: zero); {VXLAN_DECODE_HINT}")
        if side in ("inner", "both"):
            self.inner = self.writer.add_interface(
                LINKTYPE_RAW, "inner",
                description="IPv4 packets as the TUN gave (tx) or took (rx) them")
        self.packets = 0

    def write_tap(self, rec: TapRecord) -> int:
        """The record's frames (outer, inner or both as the side asks); how many."""
        n = 0
        comments = [rec.comment()]
        d = _direction(rec.direction)
        if self.outer >= 0 and rec.outer is not None:
            frame = outer_frame(rec.outer, rec.outer_src, rec.outer_dst, rec.outer_sport,
                                rec.outer_dport)
            self.writer.write_packet(self.outer, rec.ts_ns, frame, comments=comments,
                                     packet_id=rec.packet_id, direction=d)
            n += 1
        inner = rec.inner
        if inner is None and self.side == "inner" and rec.outer is not None:
            inner = inner_of(rec.outer)  # a dropped datagram's payload, for inner-only files
        if self.inner >= 0 and inner is not None:
            self.writer.write_packet(self.inner, rec.ts_ns, inner, comments=comments,
                                     packet_id=rec.packet_id, direction=d)
            n += 1
        self.packets += n
        return n

    def write_drop(self, rec: DropRecord, public_ip: str, port: int) -> int:
        """One flight-recorder record: rx as an outer frame, tx as an inner packet."""
        comments = [drop_comment(rec)]
        d = _direction(rec.direction)
        if rec.direction == "rx" and rec.outer_src and self.outer >= 0:
            frame = outer_frame(rec.data, rec.outer_src, public_ip, 0, port)
            self.writer.write_packet(self.outer, rec.ts_ns, frame, comments=comments,
                                     orig_len=rec.length + OUTER_HLEN, direction=d)
        elif self.inner >= 0:
            self.writer.write_packet(self.inner, rec.ts_ns, rec.data, comments=comments,
                                     orig_len=max(rec.length, len(rec.data)), direction=d)
        else:
            return 0
        self.packets += 1
        return 1

    def write_lost(self, ts_ns: int, lost: int) -> None:
        """An Interface Statistics Block: ``lost`` records the tap could not keep
        (``isb_ifdrop``; capinfos and Wireshark's capture file properties show it)."""
        iface = self.outer if self.outer >= 0 else self.inner
        opts = struct.pack("<HHQ", _ISB_IFDROP, 8, lost) + struct.pack("<HH", 0, 0)
        body = struct.pack("<III", iface, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF)
        total = 12 + len(body) + len(opts)
        self.stream.write(struct.pack("<II", _BT_ISB, total) + body + opts
                          + struct.pack("<I", total))


def drop_comment(rec: DropRecord) -> str:
    peer = f"peer {rec.peer}" if rec.peer else "no peer"
    src = f" from {rec.outer_src}" if rec.outer_src else ""
    many = f"; {rec.count} packets lost in one call" if rec.count > 1 else ""
    cut = f"; first {len(rec.data)} of {rec.length} bytes" if len(rec.data) < rec.length else ""
    return f"dropped: {rec.reason}; {rec.direction}{src}; {peer}{many}{cut}; flight recorder"


def tap_json(rec: TapRecord, snap: int = TRACE_SNAP) -> dict[str, Any]:
    """A tap record as one trace line's JSON (bytes as hex, cut at ``snap``)."""
    return {
        "ts_ns": rec.ts_ns, "packet_id": rec.packet_id, "direction": rec.direction,
        "verdict": rec.verdict, "reason": rec.reason, "rule": rec.rule, "peer": rec.peer,
        "peer_ip": rec.peer_ip, "peer_mac": rec.peer_mac,
        "outer_src": rec.outer_src, "outer_dst": rec.outer_dst,
        "outer_sport": rec.outer_sport, "outer_dport": rec.outer_dport,
        "inner_len": len(rec.inner) if rec.inner is not None else None,
        "outer_len": len(rec.outer) if rec.outer is not None else None,
        "inner": rec.inner[:snap].hex() if rec.inner is not None else None,
        "outer": rec.outer[:snap + VXLAN_ETH].hex() if rec.outer is not None else None,
        "comment": rec.comment(),
    }


def drop_json(rec: DropRecord) -> dict[str, Any]:
    return {"ts_ns": rec.ts_ns, "reason": rec.reason, "direction": rec.direction,
            "peer": rec.peer, "outer_src": rec.outer_src, "length": rec.length,
            "count": rec.count, "data": rec.data.hex()}


def drop_from_json(d: Mapping[str, Any]) -> DropRecord:
    return DropRecord(int(d["ts_ns"]), str(d["reason"]), str(d["direction"]), str(d["peer"]),
                      str(d["outer_src"]), int(d["length"]), bytes.fromhex(str(d["data"])),
                      int(d.get("count", 1)))
