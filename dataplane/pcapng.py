"""pcapng writer and reader (pure: the caller hands in the stream or the bytes).

Captures, the flight recorder's ``drops -w`` and tests need one file format that
Wireshark, tshark, tcpdump and scapy all read and that can carry a verdict per
packet: pcapng (draft-ietf-opsawg-pcapng) does, plain pcap does not. What the
writer uses of it:

- Section Header Block with ``shb_userappl`` = "flannelette" and an ``opt_comment``
  (Wireshark: Statistics > Capture File Properties, "Section Comment"; ``capinfos``).
- One Interface Description Block per tap (``if_name``, ``if_description``,
  ``if_tsresol`` = 9: nanosecond timestamps, as the engine takes them).
- One Enhanced Packet Block per record: ``opt_comment`` (code 1, repeatable) for the
  verdict (tshark ``frame.comment``, Wireshark shows it in Expert Info),
  ``epb_flags`` (code 2; bits 0-1 direction: 1 inbound, 2 outbound; tshark
  ``frame.packet_flags_direction``, and ``frame.p2p_dir``), ``epb_packetid`` (code 5,
  64 bits; tshark ``frame.packet_id``) so the inner and outer record of one packet
  can be linked (the spec names exactly this use: one packet seen at two points).

VXLAN decoding: flannel's VXLAN port is 8472 (the Linux default), not IANA's 4789
that Wireshark's VXLAN dissector registers (``tshark -G decodes``), and pcapng has
no way to tell a reader "decode UDP port X as Y": the draft defines no such block
or option, and Wireshark's "Decode As" is a per-user preference, not read from the
file (tshark stops at UDP without ``-d``, see the tests; scapy binds 8472 to VXLAN
on its own). Wireshark's Exported PDU link type (252) could name the dissector per
record, but only by replacing the real outer IP/UDP headers with tags, and those
headers are what an outer capture is for. So users run ``tshark -d
udp.port==8472,vxlan`` or, in Wireshark, Analyze > Decode As... UDP port 8472 ->
VXLAN; :data:`VXLAN_DECODE_HINT` says so, the writer puts it in the section comment,
and callers put it into outer interfaces' descriptions, so it shows in the capture
file properties.

All multi-byte fields are written little-endian; the reader takes either order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TypeAlias

from dataplane.errors import DataplaneError

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble
LINKTYPE_IPV4 = 228

DIRECTION_INBOUND = 1
DIRECTION_OUTBOUND = 2

# epb_flags bits beyond the direction (spec's flags word; Wireshark 4.0 shows them
# as "reserved" but keeps them): useful for records of offload work.
EPB_FLAG_CSUM_NOT_READY = 1 << 9
EPB_FLAG_CSUM_VALID = 1 << 10
EPB_FLAG_TSO = 1 << 11

VXLAN_PORT = 8472
VXLAN_DECODE_HINT = (
    f"VXLAN on UDP {VXLAN_PORT} (flannel's port; Wireshark only knows 4789): "
    f"tshark -d udp.port=={VXLAN_PORT},vxlan, or Wireshark Analyze > Decode As... "
    f"UDP port {VXLAN_PORT} -> VXLAN"
)

DEFAULT_SNAPLEN = 262144

_BT_SHB = 0x0A0D0D0A
_BT_IDB = 0x00000001
_BT_EPB = 0x00000006
_BOM = 0x1A2B3C4D

_OPT_END = 0
_OPT_COMMENT = 1
_SHB_HARDWARE = 2
_SHB_OS = 3
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_IF_TSOFFSET = 14
_EPB_FLAGS = 2
_EPB_PACKETID = 5

_U64 = 1 << 64
_MAX_OPT = 0xFFFF


class PcapngError(DataplaneError, ValueError):
    """A malformed pcapng input, or a writer call that would produce an invalid file."""


def _pad(n: int) -> int:
    return -n & 3


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad(len(value))


def _str_opt(code: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > _MAX_OPT:  # an option length is 16 bits: cut at a character boundary
        raw = raw[:_MAX_OPT].decode("utf-8", "ignore").encode("utf-8")
    return _opt(code, raw)


def _block(block_type: int, body: bytes, options: bytes) -> bytes:
    if options:
        options += _opt(_OPT_END, b"")
    total = 12 + len(body) + len(options)
    head = struct.pack("<II", block_type, total)
    return head + body + options + struct.pack("<I", total)


class PcapngWriter:
    """Writes one pcapng section to ``stream``: the header now, then blocks as asked.

    ``flush=True`` (the default) flushes after every block, so a reader at the other
    end of a pipe (``flannelette capture -w - | tshark -r -``) sees each packet as
    it is written; pass False for files written in bulk.
    """

    def __init__(
        self,
        stream: IO[bytes],
        *,
        flush: bool = True,
        comments: Sequence[str] = (VXLAN_DECODE_HINT,),
        userappl: str = "flannelette",
    ) -> None:
        self._stream = stream
        self._flush = flush
        self._ifaces: list[tuple[int, bool]] = []  # (snaplen, nanosecond timestamps)
        opts = b"".join(_str_opt(_OPT_COMMENT, c) for c in comments)
        opts += _str_opt(_SHB_USERAPPL, userappl)
        body = struct.pack("<IHHq", _BOM, 1, 0, -1)  # section length unknown: streaming
        self._write(_block(_BT_SHB, body, opts))

    @property
    def interface_count(self) -> int:
        return len(self._ifaces)

    def add_interface(
        self,
        linktype: int,
        name: str,
        snaplen: int = DEFAULT_SNAPLEN,
        description: str | None = None,
        tsresol_ns: bool = True,
    ) -> int:
        """Writes an Interface Description Block; returns its id for ``write_packet``."""
        if not 0 <= linktype <= 0xFFFF:
            raise PcapngError(f"link type {linktype} does not fit 16 bits")
        if not 0 <= snaplen <= 0xFFFFFFFF:
            raise PcapngError(f"snaplen {snaplen} does not fit 32 bits")
        opts = _str_opt(_IF_NAME, name)
        if description is not None:
            opts += _str_opt(_IF_DESCRIPTION, description)
        if tsresol_ns:
            opts += _opt(_IF_TSRESOL, b"\x09")  # 10^-9 s; without it readers assume 10^-6
        body = struct.pack("<HHI", linktype, 0, snaplen)
        self._write(_block(_BT_IDB, body, opts))
        self._ifaces.append((snaplen, tsresol_ns))
        return len(self._ifaces) - 1

    def write_packet(
        self,
        iface: int,
        ts_ns: int,
        data: bytes | memoryview,
        *,
        orig_len: int | None = None,
        comments: Sequence[str] = (),
        packet_id: int | None = None,
        direction: int | None = None,
        flags: int = 0,
    ) -> None:
        """Writes an Enhanced Packet Block.

        ``data`` longer than the interface's snaplen is cut (``orig_len`` keeps the
        wire length). ``direction`` is DIRECTION_INBOUND/OUTBOUND (or 0/None: not
        known), ``flags`` the other epb_flags bits (EPB_FLAG_*), ``packet_id`` the
        64-bit id shared by every record of the same packet.
        """
        if not 0 <= iface < len(self._ifaces):
            raise PcapngError(f"interface {iface} was not added")
        snaplen, ns = self._ifaces[iface]
        ts = ts_ns if ns else ts_ns // 1000
        if not 0 <= ts < _U64:
            raise PcapngError(f"timestamp {ts_ns} ns does not fit 64 bits")
        if direction not in (None, 0, DIRECTION_INBOUND, DIRECTION_OUTBOUND):
            raise PcapngError(f"direction {direction} is not 0, 1 (inbound) or 2 (outbound)")
        if not 0 <= flags <= 0xFFFFFFFF or flags & 3:
            raise PcapngError(f"flags {flags:#x}: 32 bits, direction bits via `direction`")
        wire = len(data) if orig_len is None else orig_len
        if wire < len(data) or wire > 0xFFFFFFFF:
            raise PcapngError(f"orig_len {wire} is below the data length {len(data)}")
        cap = bytes(data[:snaplen]) if snaplen and len(data) > snaplen else bytes(data)
        opts = b"".join(_str_opt(_OPT_COMMENT, c) for c in comments)
        word = flags | (direction or 0)
        if word:
            opts += _opt(_EPB_FLAGS, struct.pack("<I", word))
        if packet_id is not None:
            if not 0 <= packet_id < _U64:
                raise PcapngError(f"packet id {packet_id} does not fit 64 bits")
            opts += _opt(_EPB_PACKETID, struct.pack("<Q", packet_id))
        body = struct.pack("<IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(cap), wire)
        self._write(_block(_BT_EPB, body + cap + b"\0" * _pad(len(cap)), opts))

    def flush(self) -> None:
        self._stream.flush()

    def _write(self, block: bytes) -> None:
        self._stream.write(block)  # one write per block: a pipe reader never sees half
        if self._flush:
            self._stream.flush()


@dataclass(frozen=True, slots=True)
class Section:
    """A Section Header Block: its comments and the application that wrote it."""

    comments: tuple[str, ...] = ()
    userappl: str | None = None
    os: str | None = None
    hardware: str | None = None


@dataclass(frozen=True, slots=True)
class Interface:
    """An Interface Description Block; ``tsresol`` is the raw if_tsresol octet."""

    linktype: int
    snaplen: int
    name: str | None = None
    description: str | None = None
    tsresol: int = 6
    comments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Packet:
    """An Enhanced Packet Block; ``iface`` counts interfaces within its section."""

    iface: int
    ts_ns: int
    data: bytes
    orig_len: int
    comments: tuple[str, ...] = ()
    packet_id: int | None = None
    flags: int | None = None

    @property
    def direction(self) -> int:
        """0 unknown, 1 inbound, 2 outbound (bits 0-1 of epb_flags)."""
        return 0 if self.flags is None else self.flags & 3


Record: TypeAlias = Section | Interface | Packet


def _text(raw: bytes) -> str:
    # The spec: strings are not NUL-terminated, but a NUL ends one.
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _options(buf: bytes, start: int, end: int, e: str) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    off = start
    while off + 4 <= end:
        code, length = struct.unpack_from(e + "HH", buf, off)
        off += 4
        if code == _OPT_END:
            break
        if off + length > end:
            raise PcapngError(f"option {code} at {off - 4} runs past its block")
        out.append((code, buf[off : off + length]))
        off += length + _pad(length)
    return out


def _ts_to_ns(ts: int, tsresol: int, offset_s: int) -> int:
    exp = tsresol & 0x7F
    if tsresol & 0x80:
        ns = (ts * 1_000_000_000) >> exp
    elif exp <= 9:
        ns = ts * 10 ** (9 - exp)
    else:
        ns = ts // 10 ** (exp - 9)
    return ns + offset_s * 1_000_000_000


def read_pcapng(data: bytes | memoryview) -> list[Record]:
    """Parses a whole pcapng file into Section, Interface and Packet records, in order.

    Blocks other than SHB, IDB and EPB are skipped. Anything malformed (bad magic,
    lengths that do not add up, a packet on an undeclared interface, a truncated
    last block) raises :class:`PcapngError`, and nothing else.
    """
    buf = bytes(data)
    n = len(buf)
    records: list[Record] = []
    ifaces: list[tuple[int, int]] = []  # (tsresol, tsoffset) per interface of this section
    e = ""
    off = 0
    while off < n:
        if n - off < 12:
            raise PcapngError(f"truncated block header at offset {off}")
        if buf[off : off + 4] == b"\n\r\r\n":
            if n - off < 28:
                raise PcapngError(f"truncated section header at offset {off}")
            magic = buf[off + 8 : off + 12]
            if magic == b"\x4d\x3c\x2b\x1a":
                e = "<"
            elif magic == b"\x1a\x2b\x3c\x4d":
                e = ">"
            else:
                raise PcapngError(f"bad byte-order magic at offset {off}")
            ifaces = []
        elif not e:
            raise PcapngError("not a pcapng file: it does not start with a section header")
        btype, total = struct.unpack_from(e + "II", buf, off)
        if total < 12 or total % 4 or total > n - off:
            raise PcapngError(f"block at offset {off}: bad total length {total}")
        (trailer,) = struct.unpack_from(e + "I", buf, off + total - 4)
        if trailer != total:
            raise PcapngError(f"block at offset {off}: trailing length {trailer} != {total}")
        body, end = off + 8, off + total - 4
        if btype == _BT_SHB:
            if total < 28:
                raise PcapngError(f"section header at offset {off} is too short")
            major = struct.unpack_from(e + "H", buf, body + 4)[0]
            if major != 1:
                raise PcapngError(f"section at offset {off}: unsupported version {major}")
            opts = _options(buf, body + 16, end, e)
            records.append(
                Section(
                    comments=tuple(_text(v) for c, v in opts if c == _OPT_COMMENT),
                    userappl=next((_text(v) for c, v in opts if c == _SHB_USERAPPL), None),
                    os=next((_text(v) for c, v in opts if c == _SHB_OS), None),
                    hardware=next((_text(v) for c, v in opts if c == _SHB_HARDWARE), None),
                )
            )
        elif btype == _BT_IDB:
            if end - body < 8:
                raise PcapngError(f"interface block at offset {off} is too short")
            linktype, _, snaplen = struct.unpack_from(e + "HHI", buf, body)
            opts = _options(buf, body + 8, end, e)
            tsresol, tsoffset = 6, 0
            for code, v in opts:
                if code == _IF_TSRESOL and len(v) == 1:
                    tsresol = v[0]
                elif code == _IF_TSOFFSET and len(v) == 8:
                    tsoffset = struct.unpack(e + "q", v)[0]
            ifaces.append((tsresol, tsoffset))
            records.append(
                Interface(
                    linktype=linktype,
                    snaplen=snaplen,
                    name=next((_text(v) for c, v in opts if c == _IF_NAME), None),
                    description=next((_text(v) for c, v in opts if c == _IF_DESCRIPTION), None),
                    tsresol=tsresol,
                    comments=tuple(_text(v) for c, v in opts if c == _OPT_COMMENT),
                )
            )
        elif btype == _BT_EPB:
            if end - body < 20:
                raise PcapngError(f"packet block at offset {off} is too short")
            iface, ts_hi, ts_lo, caplen, wirelen = struct.unpack_from(e + "IIIII", buf, body)
            if iface >= len(ifaces):
                raise PcapngError(f"packet block at offset {off}: undeclared interface {iface}")
            pkt_start = body + 20
            if caplen > end - pkt_start:
                raise PcapngError(f"packet block at offset {off}: captured length {caplen} too big")
            opts = _options(buf, pkt_start + caplen + _pad(caplen), end, e)
            flags = next((v for c, v in opts if c == _EPB_FLAGS and len(v) == 4), None)
            pid = next((v for c, v in opts if c == _EPB_PACKETID and len(v) == 8), None)
            tsresol, tsoffset = ifaces[iface]
            records.append(
                Packet(
                    iface=iface,
                    ts_ns=_ts_to_ns((ts_hi << 32) | ts_lo, tsresol, tsoffset),
                    data=buf[pkt_start : pkt_start + caplen],
                    orig_len=wirelen,
                    comments=tuple(_text(v) for c, v in opts if c == _OPT_COMMENT),
                    packet_id=None if pid is None else struct.unpack(e + "Q", pid)[0],
                    flags=None if flags is None else struct.unpack(e + "I", flags)[0],
                )
            )
        off += total
    return records
