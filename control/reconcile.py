"""Per-peer path choice and the kernel routes it needs, as plain data (pure).

Inputs are records: the backend, the peer set, what the kernel said about each
peer's PublicIP (a route lookup, given as data) and the routes we installed.
Outputs are records too: a :class:`Decision` per peer and the replace/delete
operations that turn the installed routes into the desired ones. Nothing here
talks to the kernel; ``control/netlink.py`` asks and applies, ``control/routes.py``
glues the two. Flannel's rules, kept exactly:

* same L2 = the kernel's route lookup for the peer's PublicIP returns exactly one
  route and it has no gateway (flannel's ``ip.DirectRouting``);
* host-gw: same-L2 peers get ``<subnet> via <PublicIP>``, the others no route and
  a warning naming them;
* vxlan + DirectRouting: same-L2 peers DIRECT, the others tunnelled;
* vxlan: every peer tunnelled.

Route shape for vxlan (see docs/architecture.md, "Routes and backends"): one route
for the whole Network into the TUN device, plus a more specific ``via PublicIP``
route per DIRECT peer. Longest-prefix match sends DirectRouting peers around the
tunnel, the local ``cni0`` subnet stays local, and a subnet with no peer ends in
the engine (dropped and counted) instead of leaking out of the default route.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from control.config import BackendType
from control.errors import ControlError
from dataplane.fib import Path, Peer


class RouteError(ControlError):
    """Routes cannot be planned or applied as asked (e.g. vxlan without a TUN device)."""


def normalize_backend(kind: str) -> BackendType:
    """Backend type as flannel matches it: case-insensitively (``"VxLAN"`` is vxlan)."""
    found = BackendType.parse(kind.strip())
    if found is not None:
        return found
    raise RouteError(f"unknown backend type: {kind} (flannelette routes vxlan and host-gw)")


# ---- records ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, order=True)
class Route:
    """One IPv4 route of ours in the main table: ``dst [via gateway] dev dev``."""

    dst: ipaddress.IPv4Network
    via: ipaddress.IPv4Address | None
    dev: str

    def __str__(self) -> str:
        via = f" via {self.via}" if self.via is not None else ""
        return f"{self.dst}{via} dev {self.dev}"

    def sort_key(self) -> tuple[int, int]:
        return int(self.dst.network_address), self.dst.prefixlen


class OpKind(enum.Enum):
    """Only idempotent verbs: replace creates or overwrites, delete removes."""

    REPLACE = "replace"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class RouteOp:
    """One step of a plan."""

    kind: OpKind
    route: Route

    def __str__(self) -> str:
        return f"{self.kind.value} {self.route}"


@dataclass(frozen=True, slots=True)
class RouteLookup:
    """One route of the kernel's answer to "route get <PublicIP>"."""

    gateway: ipaddress.IPv4Address | None
    dev: str | None
    local: bool = False  # the address is one of ours (route type local)


@dataclass(frozen=True, slots=True)
class Reachability:
    """What the route lookup means for one PublicIP."""

    same_l2: bool
    dev: str | None  # outgoing device for a direct route
    detail: str  # why, for logs and /status


@dataclass(frozen=True, slots=True)
class Decision:
    """A peer with its chosen path, the reason, and a warning if it cannot be served."""

    peer: Peer
    reason: str
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one reconcile round decided."""

    decisions: tuple[Decision, ...]
    desired: tuple[Route, ...]
    ops: tuple[RouteOp, ...]
    warnings: tuple[str, ...]

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(d.peer for d in self.decisions)


# ---- the same-L2 test --------------------------------------------------------------------
def reachability(lookups: Sequence[RouteLookup] | None) -> Reachability:
    """Flannel's test: exactly one route without a gateway means "same L2 segment".

    ``None`` means the lookup failed (e.g. "network is unreachable"). A local
    address (the PublicIP is ours) is refused too: a route via ourselves loops.
    """
    if lookups is None:
        return Reachability(False, None, "no route to PublicIP")
    if len(lookups) != 1:
        return Reachability(False, None, f"{len(lookups)} routes to PublicIP")
    only = lookups[0]
    if only.local:
        return Reachability(False, None, "PublicIP is a local address")
    if only.gateway is not None:
        return Reachability(False, only.dev, f"routed via gateway {only.gateway}")
    if only.dev is None:
        return Reachability(False, None, "route to PublicIP has no device")
    return Reachability(True, only.dev, f"same L2 segment (dev {only.dev})")


# ---- path choice ---------------------------------------------------------------------------
def _peer_label(peer: Peer) -> str:
    return f"{peer.subnet} (PublicIP {peer.public_ip})"


def choose_paths(
    backend: str,
    direct_routing: bool,
    network: ipaddress.IPv4Network,
    own_subnet: ipaddress.IPv4Network,
    peers: Iterable[Peer],
    reach: Mapping[ipaddress.IPv4Address, Reachability],
) -> tuple[tuple[Decision, ...], tuple[str, ...]]:
    """Each peer's path by flannel's rules; returns (decisions, warnings not tied to a peer).

    Peers are returned sorted by subnet. A lease for our own subnet is skipped;
    a duplicate subnet keeps its first peer, with a warning.
    """
    backend = normalize_backend(backend)
    decisions: list[Decision] = []
    extra: list[str] = []
    seen: set[ipaddress.IPv4Network] = set()
    for peer in peers:
        if peer.subnet == own_subnet:
            continue  # our own lease: the agent may pass the whole lease set
        if peer.subnet in seen:
            extra.append(f"ignoring duplicate peer lease {_peer_label(peer)}")
            continue
        seen.add(peer.subnet)
        decisions.append(_decide(backend, direct_routing, network, peer, reach))
    decisions.sort(key=lambda d: int(d.peer.subnet.network_address))
    return tuple(decisions), tuple(extra)


def _decide(backend: BackendType, direct_routing: bool, network: ipaddress.IPv4Network, peer: Peer,
            reach: Mapping[ipaddress.IPv4Address, Reachability]) -> Decision:
    label = _peer_label(peer)
    if not peer.subnet.subnet_of(network):
        return Decision(replace(peer, path=Path.UNREACHABLE), "outside the Network",
                        f"peer {label} is outside the Network {network}: no route")
    if backend is BackendType.HOST_GW:
        r = reach.get(peer.public_ip) or reachability(None)
        if r.same_l2:
            return Decision(replace(peer, path=Path.DIRECT), f"host-gw: {r.detail}")
        return Decision(replace(peer, path=Path.UNREACHABLE), f"host-gw: {r.detail}",
                        f"host-gw: peer {label} is not on our L2 segment ({r.detail}): "
                        "no route installed; use vxlan (with DirectRouting) to reach it")
    if direct_routing:
        r = reach.get(peer.public_ip) or reachability(None)
        if r.same_l2:
            return Decision(replace(peer, path=Path.DIRECT), f"DirectRouting: {r.detail}")
        reason = f"DirectRouting: {r.detail}, tunnelled"
    else:
        reason = "vxlan"
    if peer.vtep_mac is None:
        return Decision(replace(peer, path=Path.UNREACHABLE), f"{reason}; no VtepMAC",
                        f"vxlan: peer {label} has no VtepMAC in its lease: cannot tunnel")
    return Decision(replace(peer, path=Path.VXLAN), reason)


def needs_lookup(backend: str, direct_routing: bool) -> bool:
    """Only host-gw and DirectRouting need the kernel's opinion on PublicIPs."""
    return normalize_backend(backend) is BackendType.HOST_GW or direct_routing


# ---- routes ---------------------------------------------------------------------------------
def desired_routes(
    backend: str,
    network: ipaddress.IPv4Network,
    device: str | None,
    decisions: Iterable[Decision],
    reach: Mapping[ipaddress.IPv4Address, Reachability],
) -> tuple[Route, ...]:
    """The routes we want: the Network into the TUN (vxlan only) and one per DIRECT peer."""
    routes: list[Route] = []
    if normalize_backend(backend) is BackendType.VXLAN:
        if not device:
            raise RouteError("backend vxlan needs the TUN device name for the Network route")
        routes.append(Route(network, None, device))
    for d in decisions:
        if d.peer.path is Path.DIRECT:
            dev = reach[d.peer.public_ip].dev
            assert dev is not None  # same_l2 implies a device
            routes.append(Route(d.peer.subnet, d.peer.public_ip, dev))
    routes.sort(key=Route.sort_key)
    return tuple(routes)


def plan_ops(desired: Iterable[Route], installed: Iterable[Route]) -> tuple[RouteOp, ...]:
    """Operations turning ``installed`` (ours, from the kernel) into ``desired``.

    Make before break: all replaces first, then deletes. A route we want whose
    destination exists with another gateway or device is replaced, never deleted
    and re-added, so traffic never sees a gap. Equal routes produce no operation.
    """
    want = {r.dst: r for r in desired}
    have = set(installed)
    replaces = [RouteOp(OpKind.REPLACE, r) for r in want.values() if r not in have]
    have_dsts_kept = set(want)
    deletes = [RouteOp(OpKind.DELETE, r) for r in have if r.dst not in have_dsts_kept]
    replaces.sort(key=lambda o: o.route.sort_key())
    deletes.sort(key=lambda o: o.route.sort_key())
    return (*replaces, *deletes)


def apply_to(installed: Iterable[Route], ops: Iterable[RouteOp]) -> frozenset[Route]:
    """What the kernel's table of our routes looks like after ``ops`` (replace by dst)."""
    table = {r.dst: r for r in installed}
    for op in ops:
        if op.kind is OpKind.REPLACE:
            table[op.route.dst] = op.route
        else:
            table.pop(op.route.dst, None)
    return frozenset(table.values())


def plan(
    *,
    backend: str,
    direct_routing: bool,
    network: ipaddress.IPv4Network,
    own_subnet: ipaddress.IPv4Network,
    device: str | None,
    peers: Iterable[Peer],
    reach: Mapping[ipaddress.IPv4Address, Reachability],
    installed: Iterable[Route],
) -> Plan:
    """One reconcile round: paths, desired routes, operations, warnings."""
    decisions, extra = choose_paths(backend, direct_routing, network, own_subnet, peers, reach)
    desired = desired_routes(backend, network, device, decisions, reach)
    ops = plan_ops(desired, installed)
    warnings = tuple(d.warning for d in decisions if d.warning is not None) + extra
    return Plan(decisions, desired, ops, warnings)


def path_changes(before: Mapping[ipaddress.IPv4Network, Path],
                 decisions: Iterable[Decision]) -> list[str]:
    """One log line per peer whose path changed (new peers included; removed ones too)."""
    lines: list[str] = []
    now: dict[ipaddress.IPv4Network, Path] = {}
    for d in decisions:
        now[d.peer.subnet] = d.peer.path
        old = before.get(d.peer.subnet)
        if old is not d.peer.path:
            was = old.value if old is not None else "new"
            lines.append(f"peer {_peer_label(d.peer)}: path {was} -> {d.peer.path.value} "
                         f"({d.reason})")
    for subnet, old in sorted(before.items(), key=lambda kv: int(kv[0].network_address)):
        if subnet not in now:
            lines.append(f"peer {subnet}: path {old.value} -> removed")
    return lines


def make_before_break(before: Iterable[Peer], after: Iterable[Peer]) -> tuple[Peer, ...]:
    """Peers for the engine while routes change: tunnelled if tunnelled before or after.

    Handing this to the engine before the route operations, and ``after`` once
    they are done, means a peer moving from DIRECT to VXLAN is already in the
    engine's table when its direct route disappears.
    """
    was_vxlan = {p.subnet for p in before if p.path is Path.VXLAN}
    out = []
    for p in after:
        if p.subnet in was_vxlan and p.path is not Path.VXLAN and p.vtep_mac is not None:
            out.append(replace(p, path=Path.VXLAN))
        else:
            out.append(p)
    return tuple(out)
