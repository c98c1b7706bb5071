"""Tap and flight-recorder records rendered as pcapng, read back by tshark and scapy (no root).

The records come from a real engine on fake devices: a ping each way, a drop
each way. Outer records become Ethernet/IPv4/UDP frames around the VXLAN
datagram, inner records raw IPv4; comments carry verdicts; the inner and outer
frame of one packet share a packet id.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from control.debugcli import BlockCounter
from control.debugpcap import (
    CaptureFile,
    drop_from_json,
    drop_json,
    outer_frame,
)
from dataplane.engine import Engine, EngineConfig
from dataplane.fib import Peer
from dataplane.pcapng import Packet, read_pcapng
from dataplane.tap import TapFilter, TapRecord, TapSubscriber
from dataplane.wire import build_frame
from tests.devices import FakeTun, FakeUdp

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
PEER_MAC = bytes.fromhex("0a0000000002")
TSHARK = shutil.which("tshark")


def _ping(src: str, dst: str, kind: int = 8) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=kind, id=7, seq=1) / (b"x" * 24))


def records() -> tuple[list[TapRecord], Engine]:
    tun, udp = FakeTun(), FakeUdp()
    e = Engine(EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC), tun, udp)
    asyncio.run(e.start())
    e.set_peers([Peer(NET("10.244.2.0/24"), ADDR("10.10.1.2"), PEER_MAC)])
    sub = TapSubscriber(TapFilter())
    e.add_tap(sub)
    tun.queue_packet(_ping("10.244.1.2", "10.244.2.2"))
    udp.queue(build_frame(1, OWN_MAC, PEER_MAC, _ping("10.244.2.2", "10.244.1.2", 0)),
              "10.10.1.2")
    bad = build_frame(1, OWN_MAC, PEER_MAC, _ping("10.244.2.2", "10.244.1.3"))
    udp.queue(b"\x00" * 8 + bad[8:], "10.10.1.2")  # VXLAN flags 0: bad_flags
    tun.queue_packet(_ping("10.244.1.2", "10.244.9.9"))
    e.tun_readable()
    e.udp_readable()
    recs = sub.drain()  # as /debug/capture hands them to CaptureFile
    e.remove_tap(sub)
    return recs, e


def _write(recs: list[TapRecord], side: str) -> bytes:
    buf = io.BytesIO()
    cf = CaptureFile(buf, side)
    for r in recs:
        cf.write_tap(r)
    cf.write_lost(recs[-1].ts_ns, 3)
    return buf.getvalue()


def test_outer_frame_is_a_valid_udp_datagram() -> None:
    payload = build_frame(1, PEER_MAC, OWN_MAC, _ping("10.244.1.2", "10.244.2.2"))
    pkt = IP(outer_frame(payload, "10.10.1.1", "10.10.1.2", 8472, 8472)[14:])
    assert (pkt.src, pkt.dst, pkt[UDP].dport) == ("10.10.1.1", "10.10.1.2", 8472)
    assert pkt.chksum == IP(bytes(IP(bytes(pkt)[:20]))).chksum  # the header checksum holds
    assert pkt[VXLAN].vni == 1 and pkt[VXLAN][ICMP].type == 8


def test_both_sides_share_packet_ids_and_carry_verdicts() -> None:
    recs, _ = records()
    data = _write(recs, "both")
    packets = [r for r in read_pcapng(data) if isinstance(r, Packet)]
    by_id: dict[int | None, list[str]] = {}
    for p in packets:
        by_id.setdefault(p.packet_id, []).append(p.comments[0])
    forwarded = [c for cs in by_id.values() for c in cs if c.startswith("forwarded")]
    assert len(forwarded) == 4  # tx and rx ping: outer + inner each
    assert any(len(cs) == 2 and cs[0] == cs[1] for cs in by_id.values())
    comments = [c for cs in by_id.values() for c in cs]
    assert any(c.startswith("dropped: bad_flags") for c in comments)
    assert any(c.startswith("dropped: no_route") for c in comments)
    counter = BlockCounter()
    for i in range(0, len(data), 7):  # fed in odd pieces, as a socket would
        counter.feed(data[i:i + 7])
    assert (counter.packets, counter.lost) == (len(packets), 3)


def test_scapy_reads_outer_frames_as_vxlan_and_inner_as_ip() -> None:
    recs, _ = records()
    pkts = rdpcap(io.BytesIO(_write(recs, "both")))
    vx = [p for p in pkts if VXLAN in p]
    assert vx and all(p[IP].dst in ("10.10.1.1", "10.10.1.2") for p in vx)
    assert any(p[VXLAN].haslayer(ICMP) for p in vx)
    inner = [p for p in pkts if VXLAN not in p and IP in p]
    assert {p[IP].dst for p in inner} >= {"10.244.2.2", "10.244.1.2", "10.244.9.9"}


def test_inner_side_shows_a_dropped_datagrams_payload_when_it_has_one() -> None:
    recs, _ = records()
    pkts = [r for r in read_pcapng(_write(recs, "inner")) if isinstance(r, Packet)]
    assert {p.iface for p in pkts} == {0}
    assert len(pkts) == 4  # tx + rx ping, tx no_route, and the bad_flags datagram's payload
    assert any(IP(p.data).dst == "10.244.1.3" and "bad_flags" in p.comments[0] for p in pkts)


@pytest.mark.skipif(TSHARK is None, reason="needs tshark")
def test_tshark_decodes_vxlan_comments_and_packet_ids(tmp_path: Path) -> None:
    recs, e = records()
    path = tmp_path / "cap.pcapng"
    path.write_bytes(_write(recs, "both"))
    out = subprocess.run([str(TSHARK), "-r", str(path), "-d", "udp.port==8472,vxlan", "-T",
                          "fields", "-E", "separator=|", "-e", "frame.interface_name", "-e",
                          "frame.packet_id", "-e", "vxlan.vni", "-e", "icmp.type", "-e",
                          "frame.comment"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines()]
    outer = [r for r in rows if r[0] == "outer"]
    inner = [r for r in rows if r[0] == "inner"]
    assert any(r[2] == "1" and r[3] == "8" and r[4].startswith("forwarded to peer") for r in outer)
    assert any(r[2] == "1" and r[3] == "0" and r[4].startswith("forwarded from peer")
               for r in outer)
    assert any(r[3] == "0" and r[4].startswith("forwarded from peer") for r in inner)
    fwd = {r[1] for r in outer if r[4].startswith("forw")}
    assert len(fwd) == 2 and fwd == {r[1] for r in inner if r[4].startswith("forw")}
    assert any("bad_flags" in r[4] for r in outer)
    # the flight recorder's records as a file too
    drops = tmp_path / "drops.pcapng"
    buf = io.BytesIO()
    cf = CaptureFile(buf)
    for d in e.recorder.records():
        cf.write_drop(drop_from_json(json.loads(json.dumps(drop_json(d)))), "10.10.1.1", 8472)
    drops.write_bytes(buf.getvalue())
    out = subprocess.run([str(TSHARK), "-r", str(drops), "-d", "udp.port==8472,vxlan", "-T",
                          "fields", "-e", "ip.src", "-e", "frame.comment"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("10.10.1.2,10.244.2.2\tdropped: bad_flags; rx from 10.10.1.2")
               for line in lines), lines
    assert any("dropped: no_route; tx" in line for line in lines), lines
