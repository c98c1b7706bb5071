"""pcapng files the writer makes, read back by scapy, by tshark and by our own reader."""

from __future__ import annotations

import contextlib
import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import PcapNgReader

from dataplane import pcapng
from dataplane.pcapng import (
    DIRECTION_INBOUND,
    DIRECTION_OUTBOUND,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_RAW,
    VXLAN_DECODE_HINT,
    Interface,
    Packet,
    PcapngError,
    PcapngWriter,
    Section,
    read_pcapng,
)

TS = 1_700_000_000_123_456_789
INNER = bytes(IP(src="10.244.1.2", dst="10.244.2.5") / ICMP(id=7, seq=3) / b"ping-payload")
OUTER = bytes(
    Ether(src="0a:11:22:33:44:01", dst="0a:11:22:33:44:02")
    / IP(src="192.168.50.1", dst="192.168.50.2")
    / UDP(sport=40001, dport=8472)
    / VXLAN(vni=1, flags=0x08)
    / Ether(src="0a:11:22:33:44:01", dst="0a:11:22:33:44:02")
    / IP(INNER)
)

needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None, reason="needs tshark (Debian package tshark)"
)


def sample() -> bytes:
    """Inner and outer record of one forwarded packet, plus an inbound drop."""
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    inner = w.add_interface(LINKTYPE_RAW, "flannel.1", description="inner (TUN side)")
    outer = w.add_interface(LINKTYPE_ETHERNET, "vxlan", description="outer; " + VXLAN_DECODE_HINT)
    verdict = "forwarded peer=10.244.2.0/24 public_ip=192.168.50.2"
    w.write_packet(inner, TS, INNER, comments=[verdict], packet_id=7, direction=DIRECTION_OUTBOUND)
    w.write_packet(
        outer, TS + 1500, OUTER, comments=[verdict, "rule=none"], packet_id=7,
        direction=DIRECTION_OUTBOUND,
    )  # fmt: skip
    w.write_packet(
        outer, TS + 9000, OUTER[:40], orig_len=len(OUTER), comments=["dropped reason=bad_flags"],
        packet_id=8, direction=DIRECTION_INBOUND,
    )  # fmt: skip
    return buf.getvalue()


def test_reader_gives_back_what_was_written() -> None:
    recs = read_pcapng(sample())
    assert recs[0] == Section(comments=(VXLAN_DECODE_HINT,), userappl="flannelette")
    assert recs[1] == Interface(LINKTYPE_RAW, 262144, "flannel.1", "inner (TUN side)", tsresol=9)
    assert isinstance(recs[2], Interface) and recs[2].linktype == LINKTYPE_ETHERNET
    assert recs[2].description is not None and "udp.port==8472,vxlan" in recs[2].description
    pkts = [r for r in recs if isinstance(r, Packet)]
    assert [(p.iface, p.ts_ns, p.packet_id, p.direction) for p in pkts] == [
        (0, TS, 7, 2), (1, TS + 1500, 7, 2), (1, TS + 9000, 8, 1),
    ]  # fmt: skip
    assert pkts[0].data == INNER and pkts[1].data == OUTER
    assert pkts[1].comments == ("forwarded peer=10.244.2.0/24 public_ip=192.168.50.2", "rule=none")
    assert pkts[2].data == OUTER[:40] and pkts[2].orig_len == len(OUTER)


def test_scapy_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    path.write_bytes(sample())
    with PcapNgReader(str(path)) as reader:
        pkts = list(reader)
    assert len(pkts) == 3
    assert pkts[0][IP].dst == "10.244.2.5" and pkts[0][ICMP].seq == 3
    assert pkts[0].sniffed_on == "flannel.1" and pkts[1].sniffed_on == "vxlan"
    assert [p.direction for p in pkts] == [2, 2, 1]
    assert pkts[1].comments == [
        b"forwarded peer=10.244.2.0/24 public_ip=192.168.50.2", b"rule=none",
    ]  # fmt: skip
    # scapy binds UDP 8472 to VXLAN itself (Linux's port); the inner ICMP is there.
    assert pkts[1][VXLAN].vni == 1 and pkts[1][ICMP].id == 7
    assert int(pkts[0].time * 10**9) == TS  # nanosecond if_tsresol honoured
    assert len(pkts[2]) == 40 and pkts[2].wirelen == len(OUTER)


def tshark_fields(path: Path, *fields: str, decode_vxlan: bool = True) -> list[list[str]]:
    cmd = ["tshark", "-n", "-r", str(path)]
    if decode_vxlan:
        cmd += ["-d", "udp.port==8472,vxlan"]
    cmd += ["-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split("|") for line in out.splitlines()]


@needs_tshark
def test_tshark_shows_comments_ids_direction_and_inner_icmp(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    path.write_bytes(sample())
    rows = tshark_fields(
        path, "frame.interface_name", "frame.comment", "frame.packet_id",
        "frame.packet_flags_direction", "frame.p2p_dir", "frame.protocols", "icmp.seq",
        "ip.src", "frame.time_epoch",
    )  # fmt: skip
    assert rows[0][:6] == [
        "flannel.1", "forwarded peer=10.244.2.0/24 public_ip=192.168.50.2", "7", "0x00000002",
        "0", "raw:ip:icmp:data",
    ]  # fmt: skip
    assert rows[0][6:8] == ["3", "10.244.1.2"]
    assert rows[0][8] == "1700000000.123456789"
    # Outer: VXLAN decoded with -d, the inner ICMP under it; both comments; same id.
    assert rows[1][1] == "forwarded peer=10.244.2.0/24 public_ip=192.168.50.2;rule=none"
    assert rows[1][2] == "7" and rows[1][3] == "0x00000002"
    assert rows[1][5] == "eth:ethertype:ip:udp:vxlan:eth:ethertype:ip:icmp:data"
    assert rows[1][6] == "3" and rows[1][7] == "192.168.50.1;10.244.1.2"
    # Inbound (p2p_dir 1 = received), truncated to 40 bytes of a longer datagram.
    assert rows[2][1:5] == ["dropped reason=bad_flags", "8", "0x00000001", "1"]
    # Without the decode hint Wireshark stops at UDP: why the hint is there.
    plain = tshark_fields(path, "frame.protocols", decode_vxlan=False)
    assert plain[1] == ["eth:ethertype:ip:udp:data"]


@needs_tshark
def test_capinfos_shows_the_vxlan_hint(tmp_path: Path) -> None:
    if shutil.which("capinfos") is None:
        pytest.skip("needs capinfos (Debian package wireshark-common)")
    path = tmp_path / "c.pcapng"
    path.write_bytes(sample())
    out = subprocess.run(
        ["capinfos", str(path)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "Capture application: flannelette" in out
    assert "Capture comment:     " + VXLAN_DECODE_HINT in out
    assert "Description = outer; " + VXLAN_DECODE_HINT in out


@needs_tshark
def test_streamed_into_tshark_through_a_pipe() -> None:
    """`capture -w - | tshark -r -`: each flushed block is readable as it arrives."""
    proc = subprocess.Popen(
        ["tshark", "-n", "-l", "-r", "-", "-T", "fields", "-e", "frame.comment"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        w = PcapngWriter(proc.stdin, flush=True)
        iface = w.add_interface(LINKTYPE_IPV4, "flannel.1")
        w.write_packet(iface, TS, INNER, comments=["first"])
        # Read the first line before writing more: only possible if it was flushed.
        assert proc.stdout.readline() == b"first\n"
        w.write_packet(iface, TS + 1, INNER, comments=["second"])
        proc.stdin.close()
        assert proc.stdout.read() == b"second\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_flush_false_leaves_flushing_to_the_caller() -> None:
    class Counting(io.BytesIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    s = Counting()
    w = PcapngWriter(s, flush=False)
    w.write_packet(w.add_interface(LINKTYPE_RAW, "x"), 0, INNER)
    assert s.flushes == 0
    w.flush()
    assert s.flushes == 1
    s2 = Counting()
    w2 = PcapngWriter(s2)
    w2.write_packet(w2.add_interface(LINKTYPE_RAW, "x"), 0, INNER)
    assert s2.flushes == 3  # SHB, IDB, EPB


def test_snaplen_cuts_data_and_keeps_wire_length() -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    w.write_packet(w.add_interface(LINKTYPE_RAW, "x", snaplen=20), 5, INNER)
    pkt = read_pcapng(buf.getvalue())[-1]
    assert isinstance(pkt, Packet)
    assert pkt.data == INNER[:20] and pkt.orig_len == len(INNER)


def test_microsecond_interface() -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    w.write_packet(w.add_interface(LINKTYPE_RAW, "x", tsresol_ns=False), TS, INNER)
    iface, pkt = read_pcapng(buf.getvalue())[1:]
    assert isinstance(iface, Interface) and iface.tsresol == 6
    assert isinstance(pkt, Packet) and pkt.ts_ns == TS // 1000 * 1000


def test_long_comment_is_cut_to_the_16_bit_option_length() -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    w.write_packet(w.add_interface(LINKTYPE_RAW, "x"), 0, b"", comments=["é" * 40000])
    pkt = read_pcapng(buf.getvalue())[-1]
    assert isinstance(pkt, Packet) and pkt.comments == ("é" * 32767,)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iface": 1},
        {"ts_ns": -1},
        {"ts_ns": 1 << 64},
        {"direction": 3},
        {"flags": 1},
        {"packet_id": 1 << 64},
        {"orig_len": 2},
    ],
)
def test_writer_refuses_what_would_make_an_invalid_file(kwargs: dict[str, int]) -> None:
    w = PcapngWriter(io.BytesIO())
    w.add_interface(LINKTYPE_RAW, "x")
    args: dict[str, int] = {"iface": 0, "ts_ns": 0}
    args.update(kwargs)
    iface, ts = args.pop("iface"), args.pop("ts_ns")
    with pytest.raises(PcapngError):
        w.write_packet(iface, ts, INNER, **args)  # type: ignore[arg-type]


def test_big_endian_file_is_read() -> None:
    """A section written big-endian by hand (other writers do): the reader follows the BOM."""

    def block(btype: int, body: bytes) -> bytes:
        total = 12 + len(body)
        return struct.pack(">II", btype, total) + body + struct.pack(">I", total)

    shb = block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = block(1, struct.pack(">HHI", LINKTYPE_RAW, 0, 0) + struct.pack(">HHB3xHH", 9, 1, 9, 0, 0))
    opts = struct.pack(">HHQ", 5, 8, 99) + struct.pack(">HH", 0, 0)
    epb = block(6, struct.pack(">IIIII", 0, 0, 1000, 4, 4) + b"abcd" + opts)
    recs = read_pcapng(shb + idb + epb)
    assert recs[2] == Packet(0, 1000, b"abcd", 4, packet_id=99)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 12,
        b"\n\r\r\n" + b"\x00" * 24,  # bad byte-order magic
        sample()[:-1],
        sample()[:30],
        sample()[:-4] + b"\x00\x00\x00\x00",  # trailing length differs
        sample() + b"\x06\x00\x00\x00\x20\x00\x00\x00",  # truncated last block
    ],
)
def test_malformed_input_raises_pcapng_error(data: bytes) -> None:
    if not data:
        assert read_pcapng(data) == []
        return
    with pytest.raises(PcapngError):
        read_pcapng(data)


def test_packet_on_undeclared_interface() -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    w.write_packet(w.add_interface(LINKTYPE_RAW, "x"), 0, INNER)
    data = buf.getvalue()
    epb = data.rindex(struct.pack("<I", 6))
    bad = data[: epb + 8] + struct.pack("<I", 5) + data[epb + 12 :]
    with pytest.raises(PcapngError, match="undeclared interface"):
        read_pcapng(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_raises_only_pcapng_error(data: st.DataObject) -> None:
    """Bytes flipped, cut or inserted anywhere: records or PcapngError, nothing else."""
    raw = bytearray(sample())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    with contextlib.suppress(PcapngError):
        read_pcapng(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_pcapng_error(data: bytes) -> None:
    with contextlib.suppress(PcapngError):
        read_pcapng(b"\n\r\r\n" + data)


comment_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))
packets = st.lists(
    st.tuples(
        st.integers(0, 1),  # interface
        st.integers(0, (1 << 64) - 1),  # ts_ns
        st.binary(max_size=100),
        st.lists(comment_text.filter(lambda s: len(s.encode()) < 200), max_size=3),
        st.none() | st.integers(0, (1 << 64) - 1),
        st.sampled_from([None, 0, DIRECTION_INBOUND, DIRECTION_OUTBOUND]),
        st.sampled_from([0, pcapng.EPB_FLAG_TSO, pcapng.EPB_FLAG_CSUM_NOT_READY]),
        st.integers(0, 50),  # extra wire length beyond the data
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(packets, st.sampled_from([LINKTYPE_RAW, LINKTYPE_ETHERNET, LINKTYPE_IPV4]))
def test_writer_reader_round_trip(pkts: list[tuple], linktype: int) -> None:  # type: ignore[type-arg]
    buf = io.BytesIO()
    w = PcapngWriter(buf, flush=False, comments=("a", "b"))
    w.add_interface(linktype, "in", description="d")
    w.add_interface(linktype, "out")
    for iface, ts, data, comments, pid, direction, flags, extra in pkts:
        w.write_packet(
            iface, ts, data, orig_len=len(data) + extra, comments=comments, packet_id=pid,
            direction=direction, flags=flags,
        )  # fmt: skip
    recs = read_pcapng(buf.getvalue())
    assert recs[0] == Section(comments=("a", "b"), userappl="flannelette")
    assert recs[1] == Interface(linktype, 262144, "in", "d", tsresol=9)
    assert recs[2] == Interface(linktype, 262144, "out", None, tsresol=9)
    got = recs[3:]
    assert len(got) == len(pkts)
    for rec, (iface, ts, data, comments, pid, direction, flags, extra) in zip(
        got, pkts, strict=True
    ):
        word = flags | (direction or 0)
        assert rec == Packet(
            iface, ts, data, len(data) + extra, tuple(comments), pid, word if word else None
        )
