"""`flannelette explain`: what this node would do with a packet, without sending it (pure).

The decision path the dataplane takes, step by step, like OVS's ``ofproto/trace``:
for a packet a container sends (``tx``), the kernel's route lookup picks the path
(a direct route via a peer's PublicIP, the TUN of the userspace engine, or
nothing), the engine's FIB entry names the peer and its lease, and the outer
headers follow; for a VXLAN datagram received from ``outer_src`` (``rx``), the
checks the engine runs (known peer, VNI, inner destination MAC, size, inner
source) in the engine's order, then where the decapsulated packet goes.

Everything comes in as values: the node (:class:`NodeView`), the probe, and the
kernel's answers to ``ip route get`` for the addresses :func:`lookups_needed`
names (the caller asks netlink); the verdict is one of :data:`VERDICTS`. On an
agent the node carries the config generation (``NodeView.generation``: the etcd
revision of ``<prefix>/config`` the dataplane runs, the changes applied since
start, whether a newer value is waiting), and the first step names it, so each
decision can be traced to the config that produced it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from control.reconcile import RouteLookup
from control.statusdoc import ConfigGeneration
from dataplane.fib import Path, Peer
from dataplane.wire import VXLAN_PORT, DropReason, flow_lane, mac_to_str

VERDICTS = ("direct", "vxlan", "dropped", "local", "no-route")
PROTOS = ("icmp", "tcp", "udp")
ENCAP = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14

Lookups = Mapping[ipaddress.IPv4Address, Sequence[RouteLookup] | None]


@dataclass(frozen=True)
class NodeView:
    """What explain needs of a node: its lease, peers (with paths) and engine settings.

    ``tun`` is the engine's TUN device (None: no userspace engine, e.g. host-gw);
    ``network`` is None for a standalone engine (no flannel network config), and so
    is ``generation`` (which version of the network config the node runs).
    """

    subnet: ipaddress.IPv4Network | None
    public_ip: ipaddress.IPv4Address | None
    vtep_mac: bytes | None = None
    network: ipaddress.IPv4Network | None = None
    backend: str = "vxlan"
    direct_routing: bool = False
    peers: tuple[Peer, ...] = ()
    lease_expiry: Mapping[ipaddress.IPv4Network, float | None] = field(default_factory=dict)
    tun: str | None = None
    vni: int = 1
    port: int = VXLAN_PORT
    mtu: int = 1450
    check_inner_source: bool = True
    generation: ConfigGeneration | None = None
    # The engine's source lanes (ports in lane order): () = everything from ``port``;
    # None = lanes whose ports are not known here (several workers, each its own).
    source_ports: tuple[int, ...] | None = ()

    def peer_for(self, addr: ipaddress.IPv4Address) -> Peer | None:
        return next((p for p in self.peers if addr in p.subnet), None)

    def to_json(self, now: float) -> dict[str, Any]:
        """The node as ``/debug/node`` serves it (and :func:`config_text` reads it)."""
        return {
            "subnet": str(self.subnet) if self.subnet else None,
            "public_ip": str(self.public_ip) if self.public_ip else None,
            "vtep_mac": mac_to_str(self.vtep_mac) if self.vtep_mac else None,
            "network": str(self.network) if self.network else None,
            "backend": self.backend, "direct_routing": self.direct_routing, "tun": self.tun,
            "vni": self.vni, "port": self.port, "mtu": self.mtu,
            "check_inner_source": self.check_inner_source,
            "source_ports": (list(self.source_ports) if self.source_ports is not None
                             else None),
            "config": self.generation.to_json() if self.generation is not None else None,
            "peers": [peer_json(p, self, now) for p in self.peers],
        }


@dataclass(frozen=True)
class Probe:
    """The packet to explain; ``outer_src`` set: a VXLAN datagram received from there."""

    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    proto: str = "icmp"
    dport: int | None = None
    sport: int | None = None
    size: int | None = None  # inner IPv4 total length
    outer_src: ipaddress.IPv4Address | None = None
    vni: int | None = None  # rx: the datagram's VNI (default: ours)
    inner_dst_mac: bytes | None = None  # rx: the inner destination MAC (default: ours)

    def __post_init__(self) -> None:
        if self.proto not in PROTOS:
            raise ValueError(f"proto must be one of {', '.join(PROTOS)}, got {self.proto!r}")
        for name, port in (("dport", self.dport), ("sport", self.sport)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.size is not None and not 20 <= self.size <= 65535:
            raise ValueError(f"size must be in 20..65535, got {self.size}")

    def text(self) -> str:
        ports = ""
        if self.proto != "icmp" and self.dport is not None:
            ports = f" {self.sport if self.sport is not None else '*'} > {self.dport}"
        size = f", {self.size} bytes" if self.size else ""
        return f"{self.proto.upper()} {self.src} > {self.dst}{ports}{size}"


@dataclass
class Explanation:
    """The verdict, the peer involved (if any), the reason and every step on the way."""

    verdict: str
    peer: Peer | None = None
    reason: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    direction: str = "tx"

    def to_json(self, node: NodeView, now: float) -> dict[str, Any]:
        return {"verdict": self.verdict, "direction": self.direction,
                "peer": peer_json(self.peer, node, now) if self.peer else None,
                "reason": self.reason, "steps": self.steps,
                "config": node.generation.to_json() if node.generation is not None else None}


def peer_json(peer: Peer, node: NodeView, now: float) -> dict[str, Any]:
    """A peer as explain reports it, with its lease expiry when the node knows it."""
    expiry = node.lease_expiry.get(peer.subnet)
    return {"subnet": str(peer.subnet), "public_ip": str(peer.public_ip),
            "vtep_mac": mac_to_str(peer.vtep_mac) if peer.vtep_mac else None,
            "path": peer.path.value, "flannelette": peer.partial_csum,
            "lease_expires_at": expiry,
            "lease_expires_in_s": round(expiry - now, 1) if expiry is not None else None}


def lookups_needed(node: NodeView, probe: Probe) -> list[ipaddress.IPv4Address]:
    """The addresses whose kernel route lookups :func:`explain` reads."""
    need = [probe.dst]
    peer = node.peer_for(probe.dst)
    if probe.outer_src is None and peer is not None and peer.public_ip not in need:
        need.append(peer.public_ip)
    return need


def route_text(addr: ipaddress.IPv4Address, found: Sequence[RouteLookup] | None) -> str:
    if not found:
        return f"{addr}: no route (unreachable)"
    r = found[0]
    if r.local:
        return f"{addr}: local (an address of this host)"
    via = f" via {r.gateway}" if r.gateway else ""
    return f"{addr}{via} dev {r.dev or '?'}"


def _lease_text(peer: Peer, node: NodeView, now: float) -> str:
    mac = mac_to_str(peer.vtep_mac) if peer.vtep_mac else "-"
    expiry = node.lease_expiry.get(peer.subnet)
    lease = (f", lease expires in {(expiry - now) / 3600:.2f} h" if expiry is not None
             else ", lease expiry unknown")
    kind = "flannelette" if peer.partial_csum else "flannel or unknown (full checksums)"
    return (f"subnet {peer.subnet}, PublicIP {peer.public_ip}, VtepMAC {mac}, "
            f"path {peer.path.value}, {kind}{lease}")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def generation_text(gen: Mapping[str, Any], now: float) -> str:
    """One line for a config generation as JSON (``ConfigGeneration.to_json``, in /status,
    /debug/node and explain's ``config``): key, etcd revision, when taken, changes
    applied since start, and what became of the newest value seen in etcd."""
    api = gen.get("etcd_api")
    unit = f"etcd {api} index" if api == "v2" else f"etcd {api} revision" if api else "etcd"
    rev, latest_rev = gen.get("revision"), gen.get("latest_revision")
    if rev is not None:
        at = f"at {unit} {rev}" if gen.get("revision_exact") else f"as read at {unit} {rev}"
    elif latest_rev is not None:
        at = f"as read at start-up, before {unit} {latest_rev}"
    else:
        at = "(revision not read yet)"
    text = f"{gen.get('key')} {at}"
    taken = gen.get("taken_at")
    if isinstance(taken, (int, float)):
        text += f", taken {_ago(now - taken)} ago"
    n = int(gen.get("applied_changes") or 0)
    text += (", no change applied since start" if n == 0 else
             f", {n} change{'s' if n != 1 else ''} applied since start")
    latest = gen.get("latest")
    newest = f"the newest value ({unit} {latest_rev})" if latest_rev is not None else \
        "the newest value"
    note = f": {gen['note']}" if gen.get("note") else ""
    if latest == "running" and latest_rev is not None:
        tail = "the newest value seen in etcd" + (f" ({gen['note']})" if note else "")
    elif latest == "running":
        tail = "etcd not read since start"
    elif latest == "same":
        tail = f"{newest} changes nothing this node uses"
    elif latest == "rejected":
        tail = f"NOT the newest: {newest} was rejected, this one kept{note}"
    elif latest == "deleted":
        tail = f"NOT the newest: the key was deleted ({unit} {latest_rev}), this one kept"
    else:
        tail = f"NOT the newest: {newest} was not applied{note}"
    return f"{text}; {tail}"


def config_text(node: Mapping[str, Any], now: float) -> str:
    """The network config a node runs, from its JSON (:meth:`NodeView.to_json`): backend
    and the settings the dataplane is built with, then :func:`generation_text`."""
    backend = str(node.get("backend"))
    if backend == "vxlan" and node.get("direct_routing"):
        backend = "vxlan + DirectRouting"
    parts = [f"backend {backend}"]
    if str(node.get("backend")).startswith("vxlan"):
        parts.append(f"VNI {node.get('vni')}, port {node.get('port')}")
    parts.append(f"MTU {node.get('mtu')}")
    if node.get("network"):
        parts.append(f"Network {node['network']}")
    gen = node.get("config")
    if not isinstance(gen, Mapping):
        return f"{', '.join(parts)}; config generation not known"
    return f"{', '.join(parts)}; from {generation_text(gen, now)}"


def explain(node: NodeView, probe: Probe, lookups: Lookups, now: float) -> Explanation:
    """The decision path for ``probe`` on ``node``, given the kernel's route lookups; the
    first step names the config generation when the node has one."""
    if probe.outer_src is not None:
        ex = _explain_rx(node, probe, probe.outer_src, lookups, now)
    else:
        ex = _explain_tx(node, probe, lookups, now)
    if node.generation is not None:
        g = node.generation
        ex.steps.insert(0, {"step": "config", "detail": config_text(node.to_json(now), now),
                            "revision": g.revision, "current": g.current})
    return ex


def _step(ex: Explanation, name: str, detail: str, **data: Any) -> None:
    ex.steps.append({"step": name, "detail": detail, **data})


def _explain_tx(node: NodeView, probe: Probe, lookups: Lookups, now: float) -> Explanation:
    ex = Explanation("no-route")
    _step(ex, "packet", f"{probe.text()} sent by a container or the host")
    dst = probe.dst
    if node.subnet is not None and dst in node.subnet:
        ex.verdict = "local"
        _step(ex, "own subnet", f"{dst} is in our subnet {node.subnet}: delivered on this "
              "host (its bridge), it never reaches the overlay")
        return ex
    found = lookups.get(dst)
    _step(ex, "kernel route", route_text(dst, found),
          gateway=str(found[0].gateway) if found and found[0].gateway else None,
          dev=found[0].dev if found else None)
    peer = node.peer_for(dst)
    if not found:
        ex.reason = "the kernel has no route to the destination"
        return ex
    first = found[0]
    if first.local:
        ex.verdict = "local"
        _step(ex, "local", f"{dst} is an address of this host")
        return ex
    if node.tun is not None and first.dev == node.tun:
        return _tx_engine(ex, node, probe, peer, lookups, now)
    if peer is not None and first.gateway is not None and first.gateway == peer.public_ip:
        ex.verdict, ex.peer = "direct", peer
        _step(ex, "lease", _lease_text(peer, node, now))
        note = ("" if peer.path is Path.DIRECT else
                f" (the engine's path for this peer is {peer.path.value}, but the kernel's "
                "route wins)")
        _step(ex, "direct route", f"routed via the peer's PublicIP {peer.public_ip} dev "
              f"{first.dev}: plain IP, no encapsulation (host-gw / DirectRouting){note}")
        return ex
    if peer is not None:
        ex.peer = peer
        _step(ex, "lease", _lease_text(peer, node, now))
        if peer.path is Path.UNREACHABLE:
            ex.reason = (f"peer {peer.subnet} (PublicIP {peer.public_ip}) is not on our L2 "
                         "segment and the backend is host-gw: no route is installed, as in "
                         "flannel")
        else:
            where = "via its PublicIP" if peer.path is Path.DIRECT else f"into {node.tun}"
            ex.reason = (f"the {peer.path.value} route for {peer.subnet} ({where}) is "
                         f"missing: the kernel sends it {route_text(dst, found)}")
        _step(ex, "no overlay route", ex.reason)
        return ex
    if node.network is not None and dst in node.network:
        ex.reason = f"no node holds a lease for {dst} in the network {node.network}"
    else:
        ex.reason = ("not overlay traffic: outside the flannel network, the kernel routes "
                     "it without flannelette")
    _step(ex, "no overlay route", ex.reason)
    return ex


def source_port(node: NodeView, probe: Probe) -> tuple[int | None, str]:
    """The outer UDP source port the engine sends ``probe``'s flow from, and its text.

    The engine picks a flow's lane by :func:`dataplane.wire.flow_lane` (addresses,
    protocol and, for TCP/UDP, ports), so the port is known when the lanes are and,
    for TCP/UDP, when both ports are given."""
    lanes = node.source_ports
    if lanes == ():
        return node.port, str(node.port)
    if lanes is None:
        return None, "(the source port of the worker's lane for this flow)"
    proto = {"icmp": 1, "tcp": 6, "udp": 17}[probe.proto]
    ports = b""
    if proto != 1:
        if probe.sport is None or probe.dport is None:
            return None, (f"(one of {', '.join(map(str, lanes))}, by the flow hash; give "
                          "sport and dport to know which)")
        ports = probe.sport.to_bytes(2, "big") + probe.dport.to_bytes(2, "big")
    header = (b"\x45\x00\x00\x00\x00\x00\x00\x00\x40" + bytes([proto]) + b"\x00\x00"
              + probe.src.packed + probe.dst.packed + ports)
    port = lanes[flow_lane(header, 0, len(lanes)) - 1]
    return port, f"{port} (the flow's source lane)"


def _tx_engine(ex: Explanation, node: NodeView, probe: Probe, peer: Peer | None,
               lookups: Lookups, now: float) -> Explanation:
    _step(ex, "tun", f"into the TUN {node.tun}: the userspace VXLAN engine reads it")
    if probe.size is not None and probe.size > node.mtu:
        _step(ex, "mtu", f"{probe.size} bytes is above the {node.tun} MTU {node.mtu}: the "
              "kernel fragments it before the TUN, or with DF set (TCP) answers ICMP "
              "fragmentation needed; the engine never sees it whole")
    if peer is None or peer.path is not Path.VXLAN:
        ex.verdict, ex.reason = "no-route", DropReason.NO_ROUTE.value
        why = ("no peer owns it" if peer is None else
               f"peer {peer.subnet}'s path is {peer.path.value}, so it has no VXLAN entry")
        _step(ex, "fib", f"no FIB entry for {probe.dst} ({why}): dropped as no_route, the "
              "engine answers ICMP host unreachable")
        return ex
    ex.peer = peer
    _step(ex, "fib", f"entry {peer.subnet}: " + _lease_text(peer, node, now),
          subnet=str(peer.subnet))
    mac = mac_to_str(peer.vtep_mac) if peer.vtep_mac else "?"
    own_mac = mac_to_str(node.vtep_mac) if node.vtep_mac else "?"
    size = f", {probe.size + ENCAP} bytes on the wire" if probe.size else ""
    sport, sport_text = source_port(node, probe)
    _step(ex, "outer headers",
          f"IPv4 {node.public_ip} > {peer.public_ip} / UDP {sport_text} > {node.port} / "
          f"VXLAN flags 0x08 VNI {node.vni} / Ethernet {own_mac} > {mac} type 0x0800 / "
          f"the inner packet (+{ENCAP} bytes{size})",
          outer_src=str(node.public_ip), outer_dst=str(peer.public_ip), udp_port=node.port,
          udp_sport=sport, vni=node.vni, inner_src_mac=own_mac, inner_dst_mac=mac)
    out = lookups.get(peer.public_ip)
    _step(ex, "outer route", route_text(peer.public_ip, out))
    if probe.proto == "tcp":
        _step(ex, "checksum", "a TCP checksum the kernel left partial is "
              + ("left partial: the peer is a flannelette engine and completes it"
                 if peer.partial_csum else "completed here: the peer may be a kernel VXLAN"))
    if not out:
        ex.verdict, ex.reason = "dropped", DropReason.SEND_FAILED.value
        _step(ex, "send", f"no route to the peer's PublicIP {peer.public_ip}: sendto() fails, "
              "dropped as send_failed")
        return ex
    if node.subnet is not None and probe.src not in node.subnet:
        if peer.partial_csum:
            ex.verdict, ex.reason = "dropped", DropReason.SPOOFED_INNER_SOURCE.value
            _step(ex, "receiver", f"inner source {probe.src} is outside our subnet "
                  f"{node.subnet}: the flannelette peer drops it as spoofed_inner_source")
            return ex
        _step(ex, "receiver", f"inner source {probe.src} is outside our subnet {node.subnet}: "
              "a kernel VXLAN peer accepts it, a flannelette peer would drop it "
              "(spoofed_inner_source)")
    ex.verdict = "vxlan"
    _step(ex, "verdict", f"tunnelled to {peer.public_ip} (peer {peer.subnet})")
    return ex


def _explain_rx(node: NodeView, probe: Probe, outer_src: ipaddress.IPv4Address,
                lookups: Lookups, now: float) -> Explanation:
    ex = Explanation("dropped", direction="rx")
    vni = node.vni if probe.vni is None else probe.vni
    dst_mac = probe.inner_dst_mac if probe.inner_dst_mac is not None else node.vtep_mac
    _step(ex, "datagram", f"VXLAN from {outer_src} to {node.public_ip}:{node.port}, VNI {vni}, "
          f"inner Ethernet to {mac_to_str(dst_mac) if dst_mac else '?'}, {probe.text()}")
    if node.tun is None:
        ex.reason = "no_engine"
        _step(ex, "engine", f"no VXLAN engine on this node (backend {node.backend}): nothing "
              f"listens on UDP {node.port}, the kernel answers ICMP port unreachable")
        return ex
    peer = next((p for p in node.peers if p.path is Path.VXLAN and p.public_ip == outer_src),
                None)
    if peer is None:
        ex.reason = DropReason.UNKNOWN_PEER.value
        other = next((p for p in node.peers if p.public_ip == outer_src), None)
        why = (f"the lease of {other.subnet} has this PublicIP but its path is "
               f"{other.path.value}, so no VXLAN from it is expected" if other else
               "no lease has this PublicIP (a node without a lease, a stale lease of a "
               "restarted node with a new address, or a spoofed source)")
        _step(ex, "peer", f"{outer_src} is no VXLAN peer's PublicIP: {why}; dropped as "
              "unknown_peer")
        return ex
    ex.peer = peer
    _step(ex, "peer", "known peer: " + _lease_text(peer, node, now))
    if vni != node.vni:
        ex.reason = DropReason.WRONG_VNI.value
        _step(ex, "vni", f"VNI {vni} is not ours ({node.vni}): dropped as wrong_vni (the "
              "sender's network config has another VNI)")
        return ex
    if dst_mac is not None and node.vtep_mac is not None and dst_mac != node.vtep_mac:
        ex.reason = DropReason.NOT_FOR_US.value
        _step(ex, "inner mac", f"inner destination {mac_to_str(dst_mac)} is not our VtepMAC "
              f"{mac_to_str(node.vtep_mac)}: the sender has a stale VtepMAC for us (its "
              "FDB/neighbour entry or lease cache predates our restart); dropped as "
              "not_for_our_mac")
        return ex
    if probe.size is not None and probe.size > node.mtu and probe.proto != "tcp":
        ex.reason = DropReason.OVERSIZE.value
        _step(ex, "size", f"{probe.size} bytes is above our MTU {node.mtu} and not a TCP "
              "packet the kernel can segment: dropped as oversize (the sender's MTU is "
              "larger than ours)")
        return ex
    if node.check_inner_source and probe.src not in peer.subnet:
        ex.reason = DropReason.SPOOFED_INNER_SOURCE.value
        _step(ex, "inner source", f"{probe.src} is outside the peer's subnet {peer.subnet}: "
              "dropped as spoofed_inner_source (a peer may only send from its own subnet)")
        return ex
    _step(ex, "inner source", f"{probe.src} is in the peer's subnet {peer.subnet}"
          if node.check_inner_source else "inner-source check is off")
    _step(ex, "tun", f"decapsulated and written to {node.tun}")
    found = lookups.get(probe.dst)
    _step(ex, "kernel route", route_text(probe.dst, found))
    ex.verdict = "vxlan"
    if node.subnet is not None and probe.dst in node.subnet:
        _step(ex, "deliver", f"{probe.dst} is in our subnet {node.subnet}: delivered to the "
              "container")
    elif not found:
        ex.verdict, ex.reason = "no-route", "the kernel has no route for the inner destination"
    return ex
