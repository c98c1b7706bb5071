"""RouteProgrammer: the one owner of this node's kernel routes.

Each :meth:`RouteProgrammer.sync` asks the kernel about the peers' PublicIPs and
for the routes we installed (by protocol tag), plans with the pure
``control.reconcile`` and applies the plan with ``control.netlink``. Reading the
installed routes every round, instead of trusting memory, makes a sync correct
after a restart, after someone deleted a route by hand, and after a failed
operation. Calls are serialised by a lock, so the agent's peer updates and the
change monitor's re-evaluations never interleave.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from control import netlink
from control import reconcile as rc
from control.config import BackendType
from control.reconcile import Decision, Route
from dataplane.fib import Path, Peer

log = logging.getLogger("flannelette.routes")

Handoff = Callable[[tuple[Peer, ...]], object]


class RouteProgrammer:
    """Chooses each peer's path and keeps the kernel's routes in line with it.

    ``device`` is the TUN device of the userspace VXLAN engine (None if the node
    only runs host-gw); ``network`` and ``own_subnet`` come from the config and
    our lease. Routes are tagged with ``proto`` (default :data:`netlink.RT_PROTO`).
    """

    def __init__(self, *, device: str | None, network: ipaddress.IPv4Network,
                 own_subnet: ipaddress.IPv4Network, proto: int = netlink.RT_PROTO,
                 table: int = netlink.MAIN_TABLE) -> None:
        self.device = device
        self.network = network
        self.own_subnet = own_subnet
        self.proto = proto
        self.table = table
        self._lock = asyncio.Lock()
        self._last: tuple[BackendType, bool, tuple[Peer, ...]] | None = None
        self._paths: dict[ipaddress.IPv4Network, Path] = {}
        self._decisions: tuple[Decision, ...] = ()
        self._warnings: tuple[str, ...] = ()
        self._installed: tuple[Route, ...] = ()
        self._op_counts: dict[str, int] = {k.value: 0 for k in rc.OpKind}
        self._op_counts["failed"] = 0
        # Route lookups per PublicIP, trusted only while watch() hears every kernel change.
        self._lookups: dict[ipaddress.IPv4Address, tuple[rc.RouteLookup, ...]] = {}
        self._watching = False

    # ---- what the agent reads --------------------------------------------------------------
    @property
    def warnings(self) -> tuple[str, ...]:
        """Warnings of the last sync: unreachable peers, failed routes, ip_forward off."""
        return self._warnings

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Each peer of the last sync with its path and the reason."""
        return self._decisions

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(d.peer for d in self._decisions)

    @property
    def routes(self) -> tuple[Route, ...]:
        """Our routes in the kernel after the last sync (or adopt)."""
        return self._installed

    @property
    def operations(self) -> dict[str, int]:
        """Route operations applied so far, by kind, plus those the kernel refused."""
        return dict(self._op_counts)

    def _count(self, ops: Sequence[rc.RouteOp], errors: Sequence[str]) -> None:
        for op in ops:
            self._op_counts[op.kind.value] += 1
        self._op_counts["failed"] += len(errors)

    def status(self) -> list[dict[str, Any]]:
        """Per-peer rows for ``/status``: subnet, PublicIP, path, reason, warning."""
        return [{"subnet": str(d.peer.subnet), "public_ip": str(d.peer.public_ip),
                 "path": d.peer.path.value, "reason": d.reason, "warning": d.warning}
                for d in self._decisions]

    # ---- the work ------------------------------------------------------------------------------
    async def adopt(self) -> tuple[Route, ...]:
        """At start: keep routes an earlier run of ours left, remove those that cannot be ours.

        Routes inside the Network (and not into our own subnet) are adopted: the
        first :meth:`sync` keeps the ones it still wants untouched, so a restart
        does not cut traffic, and deletes the rest. Others (a Network that
        changed since) are removed now. Returns the adopted routes.
        """
        async with self._lock:
            found = await netlink.alist_routes(self.proto, self.table)
            stale = [r for r in found
                     if not r.dst.subnet_of(self.network)
                     or (r.dst.overlaps(self.own_subnet) and r.dst != self.network)]
            ops = [rc.RouteOp(rc.OpKind.DELETE, r) for r in stale]
            errors = await netlink.aapply_ops(ops, self.proto, self.table)
            self._count(ops, errors)
            for op in ops:
                log.info("removed route left by an earlier run: %s", op.route)
            for e in errors:
                log.warning("could not remove an old route: %s", e)
            adopted = tuple(r for r in found if r not in stale)
            for r in adopted:
                log.info("adopted route left by an earlier run: %s", r)
            self._installed = adopted
            if not netlink.ip_forward_enabled():
                log.warning("%s", _FORWARD_WARNING)
            return adopted

    async def sync(self, backend: str, direct_routing: bool, peers: Sequence[Peer], *,
                   handoff: Handoff | None = None) -> tuple[Peer, ...]:
        """Decide every peer's path, make the kernel's routes match, return the peers.

        ``backend`` is ``"vxlan"`` or ``"host-gw"`` in any casing. The returned
        peers carry their :class:`Path`; give them to ``Fib.build``/the engine (only
        VXLAN ones are tunnelled). With ``handoff``, it is called before any route
        changes with a make-before-break peer set (a peer leaving the tunnel stays
        tunnelled until its direct route exists), so switches lose nothing.
        Raises :class:`rc.RouteError` (vxlan without a device, unknown backend) or
        :class:`netlink.NetlinkError` (the kernel refused a query); both are ControlError.
        """
        kind = rc.normalize_backend(backend)
        async with self._lock:
            return await self._sync(kind, direct_routing, tuple(peers), handoff)

    async def resync(self, handoff: Handoff | None = None) -> tuple[Peer, ...] | None:
        """Run the last sync again (after our addresses or routes changed); None if none yet."""
        async with self._lock:
            self._lookups.clear()  # the kernel changed: every cached answer may be stale
            if self._last is None:
                return None
            return await self._sync(*self._last, handoff)

    async def watch(self, on_peers: Handoff, *, debounce: float = 0.3) -> None:
        """Forever: on a link/address/route change, re-evaluate and hand the peers over.

        Run it as a task next to the agent's etcd watch; cancel it to stop. It
        re-evaluates once right after subscribing, so a change between the last
        sync and the subscription is not missed.
        """
        async with netlink.ChangeMonitor(own_proto=self.proto, debounce=debounce) as mon:
            self._watching = True
            try:
                await self._watch_loop(mon, on_peers)
            finally:
                self._watching = False
                self._lookups.clear()

    async def _watch_loop(self, mon: netlink.ChangeMonitor, on_peers: Handoff) -> None:
        first = True
        while True:
            if not first:
                await mon.wait()
            first = False
            try:
                peers = await self.resync()
            except Exception:  # a failing re-evaluation must not end the watch
                log.exception("re-evaluating routes after a change failed")
                continue
            if peers is not None:
                on_peers(peers)

    async def remove_all(self) -> tuple[Route, ...]:
        """Delete every route we installed (for cleanup); returns what was removed."""
        async with self._lock:
            removed = await asyncio.to_thread(remove_all_routes, self.proto, self.table)
            self._installed = ()
            self._paths.clear()
            return removed

    async def _sync(self, kind: BackendType, direct_routing: bool, peers: tuple[Peer, ...],
                    handoff: Handoff | None) -> tuple[Peer, ...]:
        self._last = (kind, direct_routing, peers)
        reach: dict[ipaddress.IPv4Address, rc.Reachability] = {}
        if rc.needs_lookup(kind, direct_routing):
            reach = {ip: rc.reachability(found)
                     for ip, found in (await self._route_get(peers)).items()}
        installed = await netlink.alist_routes(self.proto, self.table)
        plan = rc.plan(backend=kind, direct_routing=direct_routing, network=self.network,
                       own_subnet=self.own_subnet, device=self.device, peers=peers,
                       reach=reach, installed=installed)
        if handoff is not None and plan.ops:
            handoff(rc.make_before_break(self.peers, plan.peers))
        errors = await netlink.aapply_ops(plan.ops, self.proto, self.table)
        self._count(plan.ops, errors)
        for op in plan.ops:
            log.debug("route %s", op)
        for line in rc.path_changes(self._paths, plan.decisions):
            log.info("%s", line)
        warnings = list(plan.warnings) + [f"route operation failed: {e}" for e in errors]
        if not netlink.ip_forward_enabled():
            warnings.append(_FORWARD_WARNING)
        for w in warnings:
            if w not in self._warnings:
                log.warning("%s", w)
        self._warnings = tuple(warnings)
        self._decisions = plan.decisions
        self._paths = {d.peer.subnet: d.peer.path for d in plan.decisions}
        if errors:  # the kernel's table is the truth when something failed
            self._installed = await netlink.alist_routes(self.proto, self.table)
        else:
            self._installed = tuple(sorted(rc.apply_to(installed, plan.ops), key=Route.sort_key))
        return plan.peers

    async def _route_get(self, peers: tuple[Peer, ...]
                         ) -> dict[ipaddress.IPv4Address, tuple[rc.RouteLookup, ...] | None]:
        """The kernel's route to each peer's PublicIP, asking only for new addresses.

        While :meth:`watch` runs, every link/address/route change clears the cache
        (through :meth:`resync`), so a burst of peer changes costs one lookup per new
        PublicIP instead of one per peer; without a watch every sync asks again.
        """
        wanted = {p.public_ip for p in peers}
        if not self._watching:
            return await netlink.aroute_get(wanted)
        missing = wanted - self._lookups.keys()
        looked = await netlink.aroute_get(missing) if missing else {}
        for ip, found in looked.items():
            if found is not None:  # failures are asked again next time
                self._lookups[ip] = found
        for gone in self._lookups.keys() - wanted:
            del self._lookups[gone]
        return {ip: self._lookups.get(ip, looked.get(ip)) for ip in wanted}

    def path_of(self) -> Mapping[ipaddress.IPv4Network, Path]:
        """Subnet -> path of the last sync."""
        return dict(self._paths)


def remove_all_routes(proto: int = netlink.RT_PROTO, table: int = netlink.MAIN_TABLE
                      ) -> tuple[Route, ...]:
    """Delete every route carrying our protocol tag, whoever's run installed it
    (``flannelette cleanup`` takes a node out with it); returns what was removed."""
    return netlink.remove_routes(proto, table)


_FORWARD_WARNING = ("net.ipv4.ip_forward is 0: packets for our containers sent by "
                    "host-gw/DirectRouting peers (and decapsulated VXLAN traffic) will "
                    "not be forwarded; set it to 1")
