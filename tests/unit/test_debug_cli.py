"""The debug commands' argument errors and output formats; inject's presets (no root)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP

from control import cli, debugcli, inject
from control.debugpcap import drop_json
from dataplane.recorder import DropRecord
from dataplane.wire import Frame, build_frame, check_frame, vxlan_header

OWN_MAC = bytes.fromhex("0a0000000001")
PEER_MAC = bytes.fromhex("0a0000000002")
NODE: dict[str, Any] = {
    "subnet": "10.244.1.0/24", "public_ip": "10.10.1.1", "vtep_mac": "0a:00:00:00:00:01",
    "vni": 1, "port": 8472, "mtu": 1450,
    "peers": [{"subnet": "10.244.2.0/24", "public_ip": "10.10.1.2",
               "vtep_mac": "0a:00:00:00:00:02", "path": "vxlan"}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_commands_are_in_the_table() -> None:
    for name in ("capture", "trace", "drops", "explain", "inject"):
        assert name in cli.COMMANDS


def test_capture_without_w_says_how(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["capture", "--healthz-port", str(_free_port())]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give -w FILE, or -w -" in err


@pytest.mark.parametrize("argv", [["drops", "--reason", "gremlins"], ["capture", "-c", "x"],
                                  ["trace", "--side", "inner"], ["explain", "--proto", "sctp"],
                                  ["inject", "--malformed", "nonsense"]])
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: flannelette" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["drops"], ["trace", "-c", "1"], ["explain", "--src",
                                  "10.244.1.2", "--dst", "10.244.2.2"],
                                  ["capture", "-w", "-"], ["inject"]])
def test_unreachable_node_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    port = _free_port()
    assert cli.main([*argv, "--healthz-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no flannelette agent or engine answers" in err
    assert f"--healthz-port {port}" in err


def test_explain_needs_src_and_dst(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "--healthz-port", str(_free_port())]) == 1
    assert "give --src and --dst (or --pcap FILE)" in capsys.readouterr().err


def test_drop_lines_decode_both_directions() -> None:
    ping = bytes(IP(src="10.244.2.2", dst="10.244.1.2", ttl=3) / ICMP(id=9, seq=4) / b"abc")
    dgram = b"\x00" + build_frame(1, OWN_MAC, PEER_MAC, ping)[1:]
    rx = drop_json(DropRecord(1_700_000_000_000_000_000, "bad_flags", "rx", "10.244.2.0/24",
                              "10.10.1.2", len(dgram), dgram))
    line = debugcli.drop_line(rx)
    assert " rx bad_flags " in line and "from 10.10.1.2 (peer 10.244.2.0/24)" in line
    assert "VXLAN flags 0x00 vni 1 0a:00:00:00:00:02 > 0a:00:00:00:00:01 type 0x0800" in line
    assert "ICMP 10.244.2.2 > 10.244.1.2 echo-request id 9 seq 4 ttl 3" in line
    tx = drop_json(DropRecord(1, "no_route", "tx", "", "", len(ping), ping, count=3))
    line = debugcli.drop_line(tx)
    assert "tx no_route" in line and "from the TUN (no peer)" in line and "x3" in line
    empty = drop_json(DropRecord(1, "udp_recv_failed", "rx", "", "", 0, b""))
    assert debugcli.drop_line(empty).endswith("no packet (a failed system call)")
    short = drop_json(DropRecord(1, "truncated", "rx", "", "10.10.9.9", 5, b"\x08\0\0\0\0"))
    assert "truncated datagram of 5 bytes" in debugcli.drop_line(short)


def test_trace_line_has_outer_inner_verdict_and_rule() -> None:
    ping = bytes(IP(src="10.244.1.2", dst="10.244.2.2") / ICMP(seq=1))
    outer = build_frame(1, PEER_MAC, OWN_MAC, ping)
    d = {"ts_ns": 1, "direction": "tx", "peer": "10.244.2.0/24", "outer": outer.hex(),
         "outer_src": "10.10.1.1", "outer_dst": "10.10.1.2", "outer_sport": 8472,
         "outer_dport": 8472, "inner": ping.hex(), "verdict": "forwarded", "reason": "",
         "rule": "UDP GSO send of 2 datagrams of 1472 bytes"}
    parts = debugcli.trace_line(d).split(" | ")
    assert parts[1:3] == ["tx", "10.244.2.0/24"]
    assert parts[3].startswith("10.10.1.1:8472 > 10.10.1.2:8472 VXLAN flags 0x08 vni 1")
    assert parts[4].startswith("ICMP 10.244.1.2 > 10.244.2.2 echo-request")
    assert parts[5] == "forwarded; UDP GSO send of 2 datagrams of 1472 bytes"
    d |= {"inner": None, "verdict": "dropped", "reason": "unknown_peer", "rule": ""}
    assert debugcli.trace_line(d).endswith("ICMP 10.244.1.2 > 10.244.2.2 echo-request id 0 "
                                           "seq 1 ttl 64 len 28 | dropped (unknown_peer)")


def test_explanation_rendering() -> None:
    doc = {"verdict": "vxlan", "reason": None, "steps": [{"step": "fib", "detail": "entry x"}],
           "peer": {"subnet": "10.244.2.0/24", "public_ip": "10.10.1.2", "vtep_mac": "m"}}
    assert debugcli.render_explanation(doc) == (
        "  1. fib            entry x\n"
        "verdict: vxlan  peer 10.244.2.0/24 (PublicIP 10.10.1.2, VtepMAC m)")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    inject.options(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("kind", sorted(inject.MALFORMED))
def test_every_preset_is_refused_for_its_reason(kind: str) -> None:
    """To the peer: the peer's checks (wire.check_frame, then the inner-source check)."""
    d = inject.build(NODE, _args("--to", "10.244.2.0/24", "--malformed", kind))
    assert (d.outer_src, d.outer_dst, d.dport) == ("10.10.1.1", "10.10.1.2", 8472)
    verdict = check_frame(d.payload, len(d.payload), vxlan_header(1), PEER_MAC, 1450, True)
    expected = inject.MALFORMED[kind][1]
    if expected == "spoofed_inner_source":
        assert verdict is Frame.IPV4
        src = ipaddress.IPv4Address(d.payload[22 + 12:22 + 16])
        assert src not in ipaddress.IPv4Network("10.244.1.0/24")
    else:
        assert getattr(verdict, "value", verdict) == expected == d.expect


def test_default_datagram_to_a_peer_is_valid_and_addressed_from_our_state() -> None:
    d = inject.build(NODE, _args("--to", "10.10.1.2"))
    assert d.expect == "forwarded" and d.sport == 0
    assert check_frame(d.payload, len(d.payload), vxlan_header(1), PEER_MAC, 1450,
                       True) is Frame.IPV4
    inner = IP(d.payload[22:])
    assert (inner.src, inner.dst, inner[ICMP].type) == ("10.244.1.0", "10.244.2.0", 8)
    assert d.payload[8:14] == PEER_MAC and d.payload[14:20] == OWN_MAC


def test_impersonating_a_peer_towards_us_uses_its_mac_and_subnet() -> None:
    d = inject.build(NODE, _args("--outer-src", "10.10.1.2", "--vni", "7", "--flags", "0x0c",
                                 "--dst", "10.244.1.9", "--proto", "udp", "--dport", "53"))
    assert (d.outer_src, d.outer_dst, d.sport) == ("10.10.1.2", "10.10.1.1", 8472)
    assert d.payload[:8] == bytes([0x0C, 0, 0, 0, 0, 0, 7, 0])
    assert d.payload[8:14] == OWN_MAC and d.payload[14:20] == PEER_MAC
    inner = IP(d.payload[22:])
    assert (inner.src, inner.dst, inner.dport) == ("10.244.2.0", "10.244.1.9", 53)


def test_inject_to_an_unknown_peer_names_the_known_ones() -> None:
    with pytest.raises(debugcli.DebugError, match=r"peers: 10.244.2.0/24 \(10.10.1.2\)"):
        inject.build(NODE, _args("--to", "10.244.7.0/24"))
