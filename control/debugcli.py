"""`flannelette capture`, `drops`, `trace` and `explain`: clients of a node's /debug/* routes.

They talk to a running agent (or `flannelette engine`) on its healthz address,
like `flannelette status`, and need neither root nor a restart. Packets are
decoded here, with scapy, never in the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import struct
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from control.debugpcap import CaptureFile, drop_from_json, inner_of
from control.explain import config_text
from dataplane.wire import VXLAN_PORT, DropReason

REASONS = tuple(r.value for r in DropReason)


class DebugError(RuntimeError):
    """The node is unreachable or refused the request; the message is one line for the user."""


class NodeRefused(DebugError):
    """The node answered, with an HTTP error ``status`` (400: a parameter it refuses)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- HTTP --------------------------------------------------------------------------------------
def open_stream(host: str, port: int, path: str, params: Mapping[str, object],
                timeout: float = 3.0, stream: bool = False) -> http.client.HTTPResponse:
    """GET ``path?params``; a 200 response to read (no read timeout with ``stream``)."""
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items()
                                    if v is not None and v != ""})
    url = f"{path}?{query}" if query else path
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", url)
        sock = conn.sock  # getresponse() hands an HTTP/1.0 connection to the response
        resp = conn.getresponse()
    except OSError as exc:
        conn.close()
        raise DebugError(
            f"no flannelette agent or engine answers at http://{host}:{port} ({exc}); is "
            f"`flannelette run` (or `flannelette engine`) running, with --healthz-ip {host} "
            f"--healthz-port {port}?") from None
    if resp.status != 200:
        body = resp.read().decode(errors="replace").strip()
        conn.close()
        if resp.status == 404:
            body = f"{path} not found: the node runs a flannelette without debug endpoints"
        raise NodeRefused(resp.status, f"the node answered HTTP {resp.status}: {body}")
    if stream and sock is not None:
        sock.settimeout(None)  # a quiet capture may wait long for its next packet
    return resp


def get_json(host: str, port: int, path: str, params: Mapping[str, object],
             timeout: float = 3.0) -> dict[str, Any]:
    resp = open_stream(host, port, path, params, timeout)
    try:
        doc = json.loads(resp.read())
    except ValueError:
        raise DebugError(f"{path} did not return JSON") from None
    finally:
        resp.close()
    if not isinstance(doc, dict):
        raise DebugError(f"{path} did not return a JSON object")
    return doc


def add_node_options(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--healthz-ip", default=env("FLANNELD_HEALTHZ_IP", "127.0.0.1"),
                   help="the node's --healthz-ip (default 127.0.0.1)")
    p.add_argument("--healthz-port", type=int, default=int(env("FLANNELD_HEALTHZ_PORT", "9480")),
                   help="the node's --healthz-port (default 9480)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the node")


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--count", type=int, default=0,
                   help="stop after N records (0: no bound)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--peer", default=None, help="only records of this peer subnet")
    p.add_argument("--verdict", choices=("forwarded", "dropped"), default=None)
    p.add_argument("--reason", choices=REASONS, default=None, metavar="REASON",
                   help="only drops of this reason (see docs/debugging.md)")
    p.add_argument("--direction", choices=("tx", "rx"), default=None,
                   help="tx: container -> tunnel, rx: tunnel -> container")
    p.add_argument("filter", nargs="*",
                   help="pcap-filter expression on the inner packet, e.g. 'icmp and host "
                        "10.244.2.5'")


def _filter_params(args: argparse.Namespace) -> dict[str, object]:
    if args.count < 0:
        raise DebugError("--count must be >= 0")
    if args.duration is not None and args.duration <= 0:
        raise DebugError("--duration must be > 0")
    return {"count": args.count or None, "duration": args.duration, "peer": args.peer,
            "verdict": args.verdict, "reason": args.reason, "direction": args.direction,
            "filter": " ".join(args.filter)}


def _parse(prog: str, build: Any, argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=build.__doc__)
    build(p)
    add_node_options(p)
    return p.parse_args(list(argv))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run(prog: str, body: Any, args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop a capture/trace as Ctrl-C does
    try:
        return int(body(args))
    except DebugError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if exc.name != "scapy":
            raise
        print(f"{prog}: decoding needs scapy (pip install scapy==2.8.0, or the package's "
              "[test] extra)", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _output(path: str) -> Iterator[IO[bytes]]:
    """``path`` opened for writing, or stdout for '-'; a one-line error if it cannot be."""
    if path == "-":
        yield sys.stdout.buffer
        return
    try:
        f = open(path, "wb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise DebugError(f"cannot write {path}: {exc.strerror or exc}") from None
    with f:
        yield f


# ---- decoding (scapy, in this process only) ---------------------------------------------------
def inner_summary(data: bytes) -> str:
    """One line for an IPv4 packet: protocol, addresses, ports or ICMP type, TTL, length."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP

    try:
        pkt = IP(data)
        src, dst = pkt.src, pkt.dst
        if pkt.frag or pkt.flags.MF:
            text = f"IP {src} > {dst} fragment offset {pkt.frag * 8} proto {pkt.proto}"
        elif TCP in pkt:
            t = pkt[TCP]
            size = pkt.len - pkt.ihl * 4 - (t.dataofs or 5) * 4  # the bytes may be cut
            text = f"TCP {src}:{t.sport} > {dst}:{t.dport} [{t.flags}] seq {t.seq} len {size}"
        elif UDP in pkt:
            u = pkt[UDP]
            text = f"UDP {src}:{u.sport} > {dst}:{u.dport} len {u.len - 8}"
        elif ICMP in pkt:
            i = pkt[ICMP]
            text = f"ICMP {src} > {dst} {i.sprintf('%ICMP.type%')}"
            if i.type in (0, 8):
                text += f" id {i.id} seq {i.seq}"
        else:
            text = f"IP {src} > {dst} proto {pkt.proto}"
        return f"{text} ttl {pkt.ttl} len {pkt.len}"
    except Exception as exc:  # scapy refuses little, but never fail a listing on one packet
        return f"{len(data)} bytes, undecodable ({exc.__class__.__name__})"


def vxlan_summary(datagram: bytes) -> str:
    """The VXLAN header and inner Ethernet of a datagram (UDP payload)."""
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    if len(datagram) < 8:
        return f"truncated datagram of {len(datagram)} bytes"
    try:
        vx = VXLAN(datagram)
        flags = datagram[0]
        text = f"VXLAN flags {flags:#04x} vni {vx.vni}"
        if datagram[1:4] != b"\0\0\0" or datagram[7:8] != b"\0":
            text += f" reserved {datagram[1:4].hex()}/{datagram[7:8].hex()}"
        eth = vx.getlayer(Ether)
        if eth is None or len(datagram) < 22:
            return text + f", {len(datagram) - 8} bytes after the header"
        return text + f" {eth.src} > {eth.dst} type {eth.type:#06x}"
    except Exception as exc:
        return f"{len(datagram)} bytes, undecodable ({exc.__class__.__name__})"


def _clock(ts_ns: int, date: bool = False) -> str:
    t = time.localtime(ts_ns / 1e9)
    frac = f"{(ts_ns // 1000) % 1_000_000:06d}"
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", t) + "." + frac


def trace_line(d: Mapping[str, Any]) -> str:
    """One trace record as a line: time, direction, peer, outer, inner, verdict and rule."""
    parts = [_clock(int(d["ts_ns"])), str(d["direction"]), str(d.get("peer") or "-")]
    outer = d.get("outer")
    if outer:
        sport = int(d.get("outer_sport") or 0)
        src = f"{d.get('outer_src')}:{sport}" if sport else str(d.get("outer_src"))
        parts.append(f"{src} > {d.get('outer_dst')}:{d.get('outer_dport')} "
                     f"{vxlan_summary(bytes.fromhex(outer))}")
    inner = d.get("inner")
    raw = bytes.fromhex(inner) if inner else None
    if raw is None and outer:
        raw = inner_of(bytes.fromhex(outer))
    if raw is not None:
        parts.append(inner_summary(raw))
    verdict = str(d["verdict"]) + (f" ({d['reason']})" if d.get("reason") else "")
    parts.append(verdict + (f"; {d['rule']}" if d.get("rule") else ""))
    return " | ".join(parts)


def drop_line(d: Mapping[str, Any]) -> str:
    """One flight-recorder record as a line, decoded."""
    rec = drop_from_json(d)
    where = f"from {rec.outer_src}" if rec.outer_src else "from the TUN"
    peer = f"peer {rec.peer}" if rec.peer else "no peer"
    many = f" x{rec.count}" if rec.count > 1 else ""
    head = (f"{_clock(rec.ts_ns, date=True)} {rec.direction} {rec.reason:<22} {where} "
            f"({peer}) {rec.length} B{many}")
    if not rec.data:
        return head + " | no packet (a failed system call)"
    if rec.direction == "rx":
        body = vxlan_summary(rec.data)
        inner = inner_of(rec.data)
        if inner is not None:
            body += " | " + inner_summary(inner)
    else:
        body = inner_summary(rec.data)
    return f"{head} | {body}"


# ---- capture -----------------------------------------------------------------------------------
def capture_options(p: argparse.ArgumentParser) -> None:
    """Write the packets crossing the engine, with verdicts, as pcapng (Wireshark, tshark)."""
    p.add_argument("-w", "--write", metavar="FILE", default=None,
                   help="pcapng file to write; '-' streams to stdout (| tshark -r -)")
    p.add_argument("--side", choices=("inner", "outer", "both"), default="both",
                   help="inner: IPv4 as the TUN sees it; outer: VXLAN datagrams; both (default)")
    _add_filters(p)


class BlockCounter:
    """Counts the packet blocks of a pcapng stream as it passes, and the records lost (ISB)."""

    def __init__(self) -> None:
        self._buf = b""
        self.packets = 0
        self.lost = 0

    def feed(self, data: bytes) -> None:
        buf = self._buf + data
        while len(buf) >= 12:
            btype, blen = struct.unpack_from("<II", buf)
            if blen < 12 or len(buf) < blen:
                break
            if btype == 6:
                self.packets += 1
            elif btype == 5 and blen >= 32:
                code, size = struct.unpack_from("<HH", buf, 20)
                if code == 5 and size == 8:
                    self.lost += struct.unpack_from("<Q", buf, 24)[0]
            buf = buf[blen:]
        self._buf = buf


def _capture(args: argparse.Namespace) -> int:
    if not args.write:
        raise DebugError("capture writes pcapng: give -w FILE, or -w - to stream to stdout "
                         "(for readable lines use `flannelette trace`)")
    params = _filter_params(args) | {"side": args.side}
    counter = BlockCounter()
    with _output(args.write) as out:
        resp = open_stream(args.healthz_ip, args.healthz_port, "/debug/capture", params,
                           args.timeout, stream=True)
        try:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                counter.feed(chunk)
                out.write(chunk)
                out.flush()
        except BrokenPipeError:  # the reader (tshark -r -) went away: stop capturing
            with_pipe_closed()
        except KeyboardInterrupt:
            pass
        finally:
            resp.close()
    where = "stdout" if args.write == "-" else args.write
    print(f"flannelette capture: {counter.packets} frames written to {where}, "
          f"{counter.lost} records lost", file=sys.stderr)
    return 0


def with_pipe_closed() -> None:
    """After EPIPE on stdout: point it at /dev/null so the interpreter's flush at exit is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ---- trace -------------------------------------------------------------------------------------
def trace_options(p: argparse.ArgumentParser) -> None:
    """Print one line per packet crossing the engine: time, direction, peer, outer and inner
    headers, verdict and rule."""
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_filters(p)


def _lines(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    while True:
        line = resp.readline()
        if not line:
            return
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            yield doc


def _trace(args: argparse.Namespace) -> int:
    resp = open_stream(args.healthz_ip, args.healthz_port, "/debug/trace", _filter_params(args),
                       args.timeout, stream=True)
    end: dict[str, Any] = {}
    try:
        for d in _lines(resp):
            if "end" in d:
                end = d
                break
            if args.json:
                inner = bytes.fromhex(d["inner"]) if d.get("inner") else None
                outer = bytes.fromhex(d["outer"]) if d.get("outer") else None
                if inner is None and outer is not None:
                    inner = inner_of(outer)
                d["inner_summary"] = inner_summary(inner) if inner is not None else None
                d["outer_summary"] = vxlan_summary(outer) if outer is not None else None
                print(json.dumps(d), flush=True)
            else:
                print(trace_line(d), flush=True)
    except BrokenPipeError:
        with_pipe_closed()
    except KeyboardInterrupt:
        pass
    finally:
        resp.close()
    if end:
        print(f"flannelette trace: {end.get('records', 0)} records ({end['end']}), "
              f"{end.get('lost', 0)} lost", file=sys.stderr)
    return 0


# ---- drops -------------------------------------------------------------------------------------
def drops_options(p: argparse.ArgumentParser) -> None:
    """Show the flight recorder: the last dropped packets per reason, decoded."""
    p.add_argument("--reason", choices=REASONS, default=None, metavar="REASON",
                   help="only this drop reason")
    p.add_argument("--json", action="store_true", help="the records as JSON")
    p.add_argument("-w", "--write", metavar="FILE", default=None,
                   help="write them as pcapng, reasons as packet comments ('-': stdout)")


def _drops(args: argparse.Namespace) -> int:
    doc = get_json(args.healthz_ip, args.healthz_port, "/debug/drops", {"reason": args.reason},
                   args.timeout)
    records: list[dict[str, Any]] = list(doc.get("records") or [])
    if not doc.get("engine"):
        print("no userspace engine on this node (backend host-gw?): nothing is recorded",
              file=sys.stderr)
        return 0
    if args.write:
        with _output(args.write) as out:
            cf = CaptureFile(out, "both", port=int(doc.get("port") or VXLAN_PORT),
                             comment="flannelette drops: the flight recorder")
            for d in records:
                cf.write_drop(drop_from_json(d), str(doc.get("public_ip") or "0.0.0.0"),
                              int(doc.get("port") or VXLAN_PORT))
        print(f"flannelette drops: {len(records)} records written to "
              f"{'stdout' if args.write == '-' else args.write}", file=sys.stderr)
        return 0
    if args.json:
        for d in records:
            d["summary"] = drop_line(d).split(" | ", 1)[-1]
        print(json.dumps(doc, indent=1))
        return 0
    if not records:
        print("no drops recorded" + (f" for {args.reason}" if args.reason else ""))
        return 0
    for d in records:
        print(drop_line(d))
    held = doc.get("held") or {}
    print(f"({len(records)} records; the recorder keeps the last {doc.get('per_reason')} per "
          f"reason, {doc.get('snaplen')} bytes each; held: "
          + ", ".join(f"{k} {v}" for k, v in sorted(held.items())) + ")")
    return 0


# ---- explain -----------------------------------------------------------------------------------
def explain_options(p: argparse.ArgumentParser) -> None:
    """Explain what this node would do with a packet (or every packet of a capture), now,
    without sending anything."""
    p.add_argument("--src", default=None, help="inner source address")
    p.add_argument("--dst", default=None, help="inner destination address")
    p.add_argument("--proto", choices=("icmp", "tcp", "udp"), default="icmp")
    p.add_argument("--dport", type=int, default=None)
    p.add_argument("--sport", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="inner IPv4 total length")
    p.add_argument("--outer-src", default=None,
                   help="explain a VXLAN datagram received from this address instead")
    p.add_argument("--vni", type=int, default=None, help="received datagram's VNI")
    p.add_argument("--inner-dst-mac", default=None, help="received datagram's inner dst MAC")
    p.add_argument("--pcap", default=None, metavar="FILE",
                   help="explain every packet of a pcap/pcapng file (VXLAN datagrams as "
                        "received, or as sent when they come from the node's PublicIP)")
    p.add_argument("--max-packets", type=int, default=1000,
                   help="with --pcap: read at most N packets (default 1000)")
    p.add_argument("--json", action="store_true", help="the explanation as JSON")


def render_explanation(doc: Mapping[str, Any]) -> str:
    lines = []
    for i, s in enumerate(doc.get("steps") or [], 1):
        lines.append(f"  {i}. {s.get('step', ''):<14} {s.get('detail', '')}")
    peer = doc.get("peer")
    verdict = f"verdict: {doc.get('verdict')}"
    if peer:
        verdict += (f"  peer {peer.get('subnet')} (PublicIP {peer.get('public_ip')}, VtepMAC "
                    f"{peer.get('vtep_mac') or '-'})")
    if doc.get("reason"):
        verdict += f"  reason: {doc['reason']}"
    if doc.get("route_lookup_error"):
        lines.append(f"  (route lookup failed: {doc['route_lookup_error']})")
    return "\n".join([*lines, verdict])


@dataclass(frozen=True)
class PcapPacket:
    """One packet of a capture as ``explain --pcap`` sees it: a one-line summary and the
    /debug/explain query for it, or (``params`` None) why it is not explained."""

    number: int
    what: str
    params: dict[str, object] | None = None
    skip: str | None = None


def _broken_ipv4(ip: Any, which: str) -> str | None:
    """Why an IPv4 header's lengths are impossible (the engine's bad_ipv4_header), or None."""
    if ip.len < ip.ihl * 4 or ip.ihl < 5:
        return (f"{which}IPv4 header length {ip.ihl * 4} / total length {ip.len} are broken: "
                "the engine drops it as bad_ipv4_header")
    return None


def _inner_params(ip: Any) -> tuple[str, dict[str, object]]:
    """Summary and explain query of an IPv4 packet (scapy ``IP``) as its headers say it."""
    from scapy.layers.inet import TCP, UDP

    params: dict[str, object] = {"src": ip.src, "dst": ip.dst, "size": ip.len}
    fragment = bool(ip.frag or ip.flags.MF)
    l4 = ip.payload if not ip.frag else None
    src, dst = str(ip.src), str(ip.dst)
    if ip.proto == 6:
        params["proto"], label = "tcp", "tcp"
        if isinstance(l4, TCP):
            params |= {"sport": l4.sport, "dport": l4.dport}
            src, dst = f"{src}:{l4.sport}", f"{dst}:{l4.dport}"
    elif ip.proto == 17:
        params["proto"], label = "udp", "udp"
        if isinstance(l4, UDP):
            params |= {"sport": l4.sport, "dport": l4.dport}
            src, dst = f"{src}:{l4.sport}", f"{dst}:{l4.dport}"
    else:
        # explain's path depends on the protocol only for TCP (checksums, segmentation)
        params["proto"] = "icmp"
        label = "icmp" if ip.proto == 1 else f"ip proto {ip.proto}"
    return f"{label} {src} > {dst}" + (" fragment" if fragment else ""), params


def pcap_packets(path: str, limit: int, *, port: int = VXLAN_PORT,
                 own_ips: Sequence[str] = ()) -> list[PcapPacket]:
    """What ``explain --pcap`` asks the node for each packet of a pcap/pcapng file.

    A UDP datagram to ``port`` (the node's VXLAN port) is a VXLAN datagram: sent by
    us (its source is one of ``own_ips``, the node's PublicIP) it is explained as its
    inner packet leaving this node; from anyone else as received from that address,
    with its VNI and inner destination MAC. Any other IPv4 packet is explained as
    sent by a container (or the host). Packets explain cannot take (not IPv4, VXLAN
    not carrying IPv4, a broken inner header) get ``skip``: the reason.
    """
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    try:
        packets = rdpcap(path, count=limit)
    except (OSError, ValueError) as exc:
        raise DebugError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # scapy's Scapy_Exception for a file that is no capture
        raise DebugError(f"cannot read {path}: {exc}") from None
    out: list[PcapPacket] = []
    for n, pkt in enumerate(packets, 1):
        ip = pkt.getlayer(IP)
        if ip is None:
            out.append(PcapPacket(n, pkt.summary(), skip="not an IPv4 packet"))
            continue
        udp = ip.payload if ip.proto == 17 and not ip.frag else None
        if not isinstance(udp, UDP) or udp.dport != port:
            if (broken := _broken_ipv4(ip, "")) is not None:
                out.append(PcapPacket(n, f"IPv4 {ip.src} > {ip.dst}", skip=broken))
                continue
            what, params = _inner_params(ip)
            out.append(PcapPacket(n, what, params))
            continue
        payload = bytes(udp.payload)
        sent = str(ip.src) in own_ips
        where = f"VXLAN to {ip.dst}, as sent" if sent else f"VXLAN from {ip.src}"
        if len(payload) < 8 + 14:
            out.append(PcapPacket(n, f"udp {ip.src} > {ip.dst}:{port} ({where})", skip=(
                f"{len(payload)} bytes are no VXLAN header and inner Ethernet: the receiver "
                "drops it as truncated")))
            continue
        vx = VXLAN(payload)
        eth = vx.getlayer(Ether)
        inner = vx.getlayer(IP)
        if eth is None or inner is None:
            etype = f"EtherType {eth.type:#06x}" if eth is not None else "no Ethernet frame"
            out.append(PcapPacket(n, f"udp {ip.src} > {ip.dst}:{port} ({where})", skip=(
                f"it carries {etype}, not IPv4: explain covers IPv4 packets (the engine "
                "answers ARP requests for its own subnet itself)")))
            continue
        if (broken := _broken_ipv4(inner, "inner ")) is not None:
            out.append(PcapPacket(n, f"IPv4 {inner.src} > {inner.dst} ({where})", skip=broken))
            continue
        what, params = _inner_params(inner)
        if not sent:
            params |= {"outer_src": ip.src, "vni": vx.vni, "inner_dst_mac": eth.dst}
        out.append(PcapPacket(n, f"{what} ({where})", params))
    return out


def _explain_pcap(args: argparse.Namespace) -> int:
    host, port, t = args.healthz_ip, args.healthz_port, args.timeout
    if args.max_packets < 1:
        raise DebugError("--max-packets must be >= 1")
    node = get_json(host, port, "/debug/node", {}, t)
    own = [str(node["public_ip"])] if node.get("public_ip") else []
    packets = pcap_packets(args.pcap, args.max_packets, port=int(node.get("port") or
                                                                   VXLAN_PORT), own_ips=own)
    if not args.json:
        who = node.get("subnet") or node.get("public_ip") or "this node"
        print(f"explain --pcap {args.pcap}: {len(packets)} packets, as {who} would handle "
              "them now")
        if node.get("config"):
            print(f"config: {config_text(node, time.time())}")
    cache: dict[tuple[tuple[str, object], ...], dict[str, Any]] = {}
    tally: dict[str, int] = {}
    for pk in packets:
        doc: dict[str, Any] | None = None
        skip = pk.skip
        if pk.params is not None:
            key = tuple(sorted(pk.params.items()))
            if key not in cache:
                try:
                    cache[key] = get_json(host, port, "/debug/explain", pk.params, t)
                except NodeRefused as exc:
                    if exc.status != 400:
                        raise
                    cache[key] = {"verdict": None, "reason": str(exc)}
            doc = cache[key]
            if doc.get("verdict") is None:
                skip, doc = str(doc.get("reason")), None
        verdict = str(doc.get("verdict")) if doc is not None else "not explained"
        tally[verdict] = tally.get(verdict, 0) + 1
        if args.json:
            line = ({"packet": pk.number, "what": pk.what, **doc} if doc is not None else
                    {"packet": pk.number, "what": pk.what, "verdict": None, "reason": skip})
            print(json.dumps(line))
            continue
        if doc is None:
            print(f"#{pk.number} {pk.what}: not explained: {skip}")
            continue
        peer = doc.get("peer") or {}
        to = f" peer {peer.get('subnet')} ({peer.get('public_ip')})" if peer else ""
        why = f": {doc['reason']}" if doc.get("reason") else ""
        print(f"#{pk.number} {pk.what}: {verdict}{to}{why}")
    if not args.json:
        print("(" + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())) + ")"
              if tally else "(no packets)")
    return 0


def _explain(args: argparse.Namespace) -> int:
    host, port, t = args.healthz_ip, args.healthz_port, args.timeout
    if args.pcap:
        return _explain_pcap(args)
    if not args.src or not args.dst:
        raise DebugError("give --src and --dst (or --pcap FILE)")
    params = {"src": args.src, "dst": args.dst, "proto": args.proto, "dport": args.dport,
              "sport": args.sport, "size": args.size, "outer_src": args.outer_src,
              "vni": args.vni, "inner_dst_mac": args.inner_dst_mac}
    doc = get_json(host, port, "/debug/explain", params, t)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        direction = "received as VXLAN" if args.outer_src else "sent"
        print(f"explain: {args.proto} {args.src} > {args.dst} ({direction})")
        print(render_explanation(doc))
    return 0


# ---- entry points ------------------------------------------------------------------------------
def capture_main(argv: list[str]) -> int:
    """`flannelette capture`."""
    return _run("flannelette capture", _capture, _parse("flannelette capture", capture_options,
                                                        argv))


def trace_main(argv: list[str]) -> int:
    """`flannelette trace`."""
    return _run("flannelette trace", _trace, _parse("flannelette trace", trace_options, argv))


def drops_main(argv: list[str]) -> int:
    """`flannelette drops`."""
    return _run("flannelette drops", _drops, _parse("flannelette drops", drops_options, argv))


def explain_main(argv: list[str]) -> int:
    """`flannelette explain`."""
    return _run("flannelette explain", _explain, _parse("flannelette explain", explain_options,
                                                        argv))
