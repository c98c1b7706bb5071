"""`flannelette inject`: build a VXLAN datagram with scapy from the node's state and send it.

For testing paths and middleboxes (does UDP VXLAN_PORT arrive? does the peer accept
our VtepMAC?) and the receiver's drop reasons: defaults come from the node's
``/debug/node`` (own subnet, PublicIP, VtepMAC, VNI, port; peers with their
PublicIP and VtepMAC), every field can be overridden, and ``--malformed KIND``
presets make one thing wrong on purpose (each names the drop reason a
flannelette receiver gives it). ``--outer-src`` other than our PublicIP sends
through a raw IP_HDRINCL socket (needs CAP_NET_RAW), to impersonate a peer in a
lab. Only this process touches scapy; the engine never does.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control.debugcli import (
    DebugError,
    _parse,
    _run,
    get_json,
    inner_summary,
    vxlan_summary,
)
from dataplane.wire import VXLAN_PORT

# kind -> (what it does, the drop reason a flannelette receiver counts)
MALFORMED: dict[str, tuple[str, str]] = {
    "bad-flags": ("VXLAN flags 0x00 (the I bit clear)", "bad_flags"),
    "reserved": ("a reserved VXLAN byte set", "bad_flags"),
    "wrong-vni": ("VNI + 1", "wrong_vni"),
    "truncated": ("the datagram cut to 12 bytes", "truncated"),
    "stale-mac": ("inner destination MAC not the receiver's VtepMAC", "not_for_our_mac"),
    "own-mac": ("inner source MAC = the receiver's VtepMAC", "own_mac_source"),
    "not-ipv4": ("inner EtherType 0x86dd (IPv6)", "not_ipv4"),
    "bad-checksum": ("inner IPv4 header checksum wrong", "bad_ipv4_header"),
    "ttl0": ("inner TTL 0", "ttl_expired"),
    "oversize": ("an inner UDP packet 100 bytes above the MTU", "oversize"),
    "spoofed-inner": ("inner source outside the sender's subnet", "spoofed_inner_source"),
}
STALE_MAC = "0a:de:ad:be:ef:01"


@dataclass
class Datagram:
    """What will be sent: the UDP payload and its addresses, plus what to expect."""

    payload: bytes
    outer_src: str
    outer_dst: str
    sport: int
    dport: int
    expect: str  # "forwarded" or the expected drop reason


def options(p: argparse.ArgumentParser) -> None:
    """Build a VXLAN datagram from the node's own state and send it to a peer or to the
    local engine."""
    p.add_argument("--to", default="local",
                   help="'local' (this node's engine; default), or a peer: its subnet, an "
                        "address in it, or its PublicIP")
    p.add_argument("--outer-src", default=None,
                   help="outer source address (default our PublicIP; another one is sent "
                        "through a raw socket: impersonate a peer in a lab)")
    p.add_argument("--outer-dst", default=None, help="outer destination (default from --to)")
    p.add_argument("--sport", type=int, default=None,
                   help="outer UDP source port (default: any; 8472 with a raw socket)")
    p.add_argument("--port", type=int, default=None, help="outer UDP destination port")
    p.add_argument("--flags", type=lambda t: int(t, 0), default=None,
                   help="VXLAN flags byte (default 0x08)")
    p.add_argument("--vni", type=int, default=None, help="default: the node's VNI")
    p.add_argument("--inner-src-mac", default=None)
    p.add_argument("--inner-dst-mac", default=None)
    p.add_argument("--src", default=None, help="inner source address")
    p.add_argument("--dst", default=None, help="inner destination address")
    p.add_argument("--proto", choices=("icmp", "udp", "tcp"), default="icmp")
    p.add_argument("--dport", type=int, default=7, help="inner TCP/UDP port (default 7)")
    p.add_argument("--ttl", type=int, default=64)
    p.add_argument("--payload-size", type=int, default=32, help="inner payload bytes")
    p.add_argument("--malformed", choices=sorted(MALFORMED), default=None,
                   help="one preset fault: " + "; ".join(
                       f"{k}: {v[0]} ({v[1]})" for k, v in sorted(MALFORMED.items())))
    p.add_argument("-c", "--count", type=int, default=1, help="datagrams to send (default 1)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between them")
    p.add_argument("--dry-run", action="store_true", help="print the datagram, send nothing")


def _peer(node: Mapping[str, Any], to: str) -> dict[str, Any]:
    peers: list[dict[str, Any]] = list(node.get("peers") or [])
    try:
        if "/" in to:
            net = ipaddress.IPv4Network(to, strict=False)
            found = [p for p in peers if ipaddress.IPv4Network(p["subnet"]) == net]
        else:
            addr = ipaddress.IPv4Address(to)
            found = [p for p in peers if p["public_ip"] == str(addr)
                     or addr in ipaddress.IPv4Network(p["subnet"])]
    except ValueError:
        raise DebugError(f"--to wants 'local', a peer subnet or an address, got {to!r}") from None
    if not found:
        known = ", ".join(f"{p['subnet']} ({p['public_ip']})" for p in peers) or "none"
        raise DebugError(f"no peer matches {to!r}; peers: {known}")
    return found[0]


def _vtep(subnet: str | None) -> str:
    return str(ipaddress.IPv4Network(subnet).network_address) if subnet else "10.0.0.1"


def build(node: Mapping[str, Any], args: argparse.Namespace) -> Datagram:
    """The datagram ``args`` ask for, with the node's state as defaults (scapy)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    own_ip = str(node.get("public_ip") or "")
    own_mac = str(node.get("vtep_mac") or "")
    kind = args.malformed
    if args.to == "local":
        outer_src = args.outer_src or own_ip
        sender = next((p for p in node.get("peers") or [] if p["public_ip"] == outer_src), None)
        dst_mac, outer_dst = own_mac, own_ip
        src_mac = sender["vtep_mac"] if sender and sender.get("vtep_mac") else STALE_MAC
        src = _vtep(sender["subnet"]) if sender else _vtep(node.get("subnet"))
        dst = _vtep(node.get("subnet"))
        sender_subnet = sender["subnet"] if sender else None
        receiver_mac = own_mac
    else:
        peer = _peer(node, args.to)
        outer_src = args.outer_src or own_ip
        outer_dst, dst_mac, src_mac = peer["public_ip"], peer.get("vtep_mac") or "", own_mac
        src, dst = _vtep(node.get("subnet")), _vtep(peer["subnet"])
        sender_subnet = node.get("subnet")
        receiver_mac = dst_mac
    vni = int(node.get("vni") or 1) if args.vni is None else args.vni
    flags = 0x08 if args.flags is None else args.flags
    src_mac = args.inner_src_mac or src_mac
    dst_mac = args.inner_dst_mac or dst_mac
    src, dst = args.src or src, args.dst or dst
    ethertype, ttl, size, reserved = 0x0800, args.ttl, args.payload_size, 0
    if kind == "bad-flags":
        flags = 0x00
    elif kind == "reserved":
        reserved = 1
    elif kind == "wrong-vni":
        vni = (vni + 1) & 0xFFFFFF
    elif kind == "stale-mac":
        dst_mac = STALE_MAC
    elif kind == "own-mac":
        src_mac = receiver_mac
    elif kind == "not-ipv4":
        ethertype = 0x86DD
    elif kind == "ttl0":
        ttl = 0
    elif kind == "spoofed-inner":
        net = ipaddress.IPv4Network(sender_subnet) if sender_subnet else None
        src = str(net.network_address + net.num_addresses + 7) if net else "10.255.255.7"
    if kind == "oversize":
        size = int(node.get("mtu") or 1450) + 100 - 28
        args.proto = "udp"
    body = Raw(b"\xab" * max(size, 0))
    l4: Any = (ICMP(type=8, id=os.getpid() & 0xFFFF, seq=1) if args.proto == "icmp" else
               UDP(sport=40000, dport=args.dport) if args.proto == "udp" else
               TCP(sport=40000, dport=args.dport, flags="S"))
    inner = IP(src=src, dst=dst, ttl=ttl, id=1) / l4 / body
    raw_inner = bytes(inner)
    if kind == "bad-checksum":
        raw_inner = raw_inner[:10] + bytes([raw_inner[10] ^ 0xFF]) + raw_inner[11:]
    # The VXLAN header byte by byte: scapy's VXLAN layer reads meaning into flag bits
    # (GPE, GBP) and would add fields; here every flag value goes out as given.
    header = struct.pack("!B3sI", flags & 0xFF, b"\0\0\0", (vni << 8) | reserved)
    frame = header + bytes(Ether(src=src_mac, dst=dst_mac, type=ethertype)) + raw_inner
    if kind == "truncated":
        frame = frame[:12]
    port = args.port or int(node.get("port") or VXLAN_PORT)
    sport = args.sport if args.sport is not None else (
        port if outer_src != own_ip else 0)
    expect = MALFORMED[kind][1] if kind else "forwarded"
    return Datagram(frame, outer_src, outer_dst, sport, port, expect)


def send(d: Datagram, own_ip: str) -> None:
    """Send ``d`` once: a UDP socket from our PublicIP, or a raw IP_HDRINCL socket."""
    if d.outer_src == own_ip or not d.outer_src:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((own_ip or "0.0.0.0", d.sport))
            s.sendto(d.payload, (d.outer_dst, d.dport))
        return
    from scapy.layers.inet import IP, UDP

    packet = bytes(IP(src=d.outer_src, dst=d.outer_dst, ttl=64, flags="DF")
                   / UDP(sport=d.sport, dport=d.dport) / d.payload)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        s.sendto(packet, (d.outer_dst, 0))


def _inject(args: argparse.Namespace) -> int:
    if args.count < 1 or args.interval < 0:
        raise DebugError("--count must be >= 1 and --interval >= 0")
    node = get_json(args.healthz_ip, args.healthz_port, "/debug/node", {}, args.timeout)
    if not node.get("public_ip"):
        raise DebugError("the node has no PublicIP yet (no lease)")
    d = build(node, args)
    raw = " via a raw socket" if d.outer_src != node["public_ip"] else ""
    sport = f":{d.sport}" if d.sport else ""
    summary = vxlan_summary(d.payload)
    if len(d.payload) > 22:
        summary += " | " + inner_summary(d.payload[22:])
    expect = ("expect it forwarded" if d.expect == "forwarded" else
              f"malformed {args.malformed}: expect the receiver to drop it as {d.expect}")
    verb = "would send" if args.dry_run else "sent"
    for i in range(args.count):
        if not args.dry_run:
            try:
                send(d, str(node["public_ip"]))
            except PermissionError:
                raise DebugError("a raw socket needs root or CAP_NET_RAW (for --outer-src)"
                                 ) from None
            except OSError as exc:
                raise DebugError(f"sending to {d.outer_dst}:{d.dport} failed: {exc}") from None
        if i + 1 < args.count:
            time.sleep(args.interval)
    print(f"{verb} {args.count} x {len(d.payload)}-byte VXLAN datagram {d.outer_src}{sport} > "
          f"{d.outer_dst}:{d.dport}{raw}: {summary} ({expect})")
    if args.dry_run:
        print(d.payload.hex())
    return 0


def main(argv: list[str]) -> int:
    """`flannelette inject`."""
    return _run("flannelette inject", _inject, _parse("flannelette inject", options, argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
