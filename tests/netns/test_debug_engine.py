"""The debug commands against two real `flannelette engine` hosts (benchmarks/debug_lab.py).

A capture during a bounded ping, read back by tshark with the VXLAN decode;
the same capture streamed into `tshark -r -`; malformed datagrams sent with
`flannelette inject` found again in `flannelette drops` and in a capture with
their reasons; a trace line per packet. One lab serves the module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.debug_lab import REPO, engines_lab, fl, fl_popen, status, wait_taps
from benchmarks.lab import Host, Lab

pytestmark = [pytest.mark.netns("ping", "tshark")]

World = tuple[Lab, Host, Host, Host, Path]
FIELDS = ["frame.interface_name", "frame.packet_id", "vxlan.vni", "icmp.type", "frame.comment"]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with engines_lab() as w:
        lab, h1, h2, _, _ = w
        assert h1.container_ns and h2.container_ip
        assert lab.wait_ping(h1.container_ns, h2.container_ip)
        yield w


def _ping(lab: Lab, src: Host, dst: Host, count: int = 3) -> None:
    assert src.container_ns and dst.container_ip
    assert lab.ping(src.container_ns, dst.container_ip, count=count).returncode == 0


def _tshark(path: Path | str, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-d", "udp.port==8472,vxlan", "-T", "fields", "-E",
            "separator=|"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines()]


def test_capture_during_a_ping_reads_back_in_tshark(world: World, tmp_path: Path) -> None:
    lab, h1, h2, _, _ = world
    path = tmp_path / "ping.pcapng"
    proc = fl_popen(lab, h1, "capture", "-w", str(path), "-c", "6", "icmp")
    wait_taps(lab, h1, 1)
    _ping(lab, h1, h2)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "12 frames written" in err and "0 records lost" in err
    rows = _tshark(path, *FIELDS)
    outer = [r for r in rows if r[0] == "outer"]
    inner = [r for r in rows if r[0] == "inner"]
    assert len(outer) == len(inner) == 6
    # outer frames: VXLAN VNI 1 with the inner ICMP; requests out, replies in
    assert {(r[2], r[3]) for r in outer} == {("1", "8"), ("1", "0")}
    assert {r[3] for r in inner} == {"8", "0"}
    for r in outer + inner:
        want = ("forwarded to peer 10.244.2.0/24" if r[3] == "8" else
                "forwarded from peer 10.244.2.0/24")
        assert r[4].startswith(want) and "VtepMAC 0a:11:22:33:44:02" in r[4], r
    # each inner packet is linked to its VXLAN datagram by the packet id (and comment)
    assert sorted((r[1], r[4]) for r in outer) == sorted((r[1], r[4]) for r in inner)
    assert len({r[1] for r in outer}) == 6
    assert status(lab, h1)["engine"]["taps_active"] == 0


def test_capture_to_stdout_streams_into_tshark(world: World) -> None:
    lab, h1, h2, _, _ = world
    pipeline = (f"PYTHONPATH={REPO} {sys.executable} -m control.cli capture -w - -c 4 --side "
                "outer icmp | tshark -l -r - -d udp.port==8472,vxlan -T fields -e vxlan.vni "
                "-e icmp.type -e frame.comment")
    proc = lab.popen(h1.ns, "sh", "-c", pipeline, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    wait_taps(lab, h1, 1)
    _ping(lab, h1, h2, count=2)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(vni, kind) for vni, kind, _ in lines] == [("1", "8"), ("1", "0")] * 2, out + err
    assert all(c.startswith("forwarded") for _, _, c in lines)
    assert "4 frames written to stdout" in err


KINDS = {"bad-flags": "bad_flags", "wrong-vni": "wrong_vni", "truncated": "truncated",
         "stale-mac": "not_for_our_mac", "spoofed-inner": "spoofed_inner_source",
         "ttl0": "ttl_expired", "not-ipv4": "not_ipv4", "bad-checksum": "bad_ipv4_header"}


def test_injected_malformed_datagrams_show_in_drops_and_capture(world: World,
                                                               tmp_path: Path) -> None:
    lab, h1, h2, _, _ = world
    path = tmp_path / "drops-live.pcapng"
    cap = fl_popen(lab, h1, "capture", "-w", str(path), "--verdict", "dropped", "--direction",
                   "rx", "-c", str(len(KINDS) + 1))
    wait_taps(lab, h1, 1)
    for kind in KINDS:  # from the peer h2, the way a middlebox test would
        res = fl(lab, h2, "inject", "--to", "10.244.1.0/24", "--malformed", kind, check=True)
        assert f"drop it as {KINDS[kind]}" in res.stdout
    # and one impersonating a stranger through a raw socket, on h1 itself
    res = fl(lab, h1, "inject", "--outer-src", "10.10.1.3", check=True)
    assert "via a raw socket" in res.stdout
    _, err = cap.communicate(timeout=30)
    assert cap.returncode == 0, err
    comments = [r[1] for r in _tshark(path, "frame.interface_name", "frame.comment")]
    want = sorted({*KINDS.values(), "unknown_peer"})
    assert sorted(c.split(";")[0].removeprefix("dropped: ") for c in comments) == want
    doc = json.loads(fl(lab, h1, "drops", "--json", check=True).stdout)
    got = {r["reason"]: r for r in doc["records"]}
    assert set(want) <= set(got)
    assert got["unknown_peer"]["outer_src"] == "10.10.1.3"
    assert got["bad_flags"]["peer"] == "10.244.2.0/24"
    assert got["spoofed_inner_source"]["length"] < 200  # the datagram, not the receive buffer
    text = fl(lab, h1, "drops", "--reason", "wrong_vni", check=True).stdout.splitlines()
    assert text[0].split()[3] == "wrong_vni" and "VXLAN flags 0x08 vni 2" in text[0]
    out = tmp_path / "recorder.pcapng"
    fl(lab, h1, "drops", "-w", str(out), check=True)
    comments = [r[0] for r in _tshark(out, "frame.comment")]
    assert {c.split(";")[0].removeprefix("dropped: ") for c in comments} >= set(want)


def test_trace_prints_one_line_per_packet(world: World) -> None:
    lab, h1, h2, _, _ = world
    proc = fl_popen(lab, h1, "trace", "-c", "2", "icmp")
    wait_taps(lab, h1, 1)
    _ping(lab, h1, h2, count=1)
    out, err = proc.communicate(timeout=30)
    lines = out.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, out + err
    tx, rx = (line.split(" | ") for line in lines)
    assert tx[1:3] == ["tx", "10.244.2.0/24"] and rx[1:3] == ["rx", "10.244.2.0/24"]
    # from the source lane of the ping's flow (one of the ports /status lists) to 8472
    m = re.match(r"10\.10\.1\.1:(\d+) > 10\.10\.1\.2:8472 VXLAN flags 0x08 vni 1", tx[3])
    lanes = status(lab, h1)["engine"]["source_ports"].split(",")
    assert m is not None and m.group(1) in lanes
    assert re.match(r"10\.10\.1\.2:\d+ > 10\.10\.1\.1:8472 VXLAN", rx[3]), rx[3]
    assert tx[4].startswith("ICMP 10.244.1.2 > 10.244.2.2 echo-request")
    assert rx[4].startswith("ICMP 10.244.2.2 > 10.244.1.2 echo-reply")
    assert tx[5] == "forwarded" and rx[5].startswith("forwarded")
    assert "2 records (bound reached), 0 lost" in err
