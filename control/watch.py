"""The peer watch: a snapshot, then a watch, turned into whole peer sets.

One task owns it. It keeps every valid lease by subnet, hands the agent the
peer set (same backend type, our own lease left out) whenever that set really
changes, and tells the agent when our own lease disappeared. On etcd errors it
backs off and resumes from its cursor; on a cursor that is too old it re-lists
and diffs. While etcd is away nothing is handed out, so the dataplane keeps the
last peer set it was given.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping

from control.backoff import Backoff
from control.config import BackendType
from control.errors import LeaseValueError, RegistryUnavailable, ResyncRequired
from control.lease import Lease, RawLease, decode_lease, diff_leases
from control.registry import Registry, WatchEvent

log = logging.getLogger("flannelette.watch")

Subnet = ipaddress.IPv4Network
PeerMap = Mapping[Subnet, Lease]


class PeerWatcher:
    """Snapshot + watch of ``<prefix>/subnets`` for one node."""

    def __init__(self, registry: Registry, *, backend_type: BackendType,
                 own_subnet: Callable[[], Subnet | None],
                 on_peers: Callable[[PeerMap], None],
                 on_own_lease_lost: Callable[[], None],
                 clock: Callable[[], float],
                 own_public_ip: Callable[[], ipaddress.IPv4Address | None] = lambda: None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 backoff: Backoff | None = None,
                 watch_timeout: float = 10.0) -> None:
        self._registry = registry
        self._backend_type = backend_type
        self._own_subnet = own_subnet
        self._on_peers = on_peers
        self._on_own_lease_lost = on_own_lease_lost
        self._own_public_ip = own_public_ip
        self._clock = clock
        self._sleep = sleep
        self.backoff = backoff or Backoff()
        self._watch_timeout = watch_timeout
        self.leases: dict[Subnet, Lease] = {}
        self.peers: dict[Subnet, Lease] = {}
        self.cursor = 0
        self.synced = False  # a snapshot has been taken at least once
        self.connected = False
        self.reconnects = 0  # times etcd came back after the watch had lost it
        self.resyncs = 0
        self._warned: set[tuple[Subnet, str]] = set()

    # ---- pure-ish table upkeep -----------------------------------------------------------
    def _decode(self, raw: RawLease) -> Lease | None:
        try:
            return decode_lease(raw)
        except LeaseValueError as exc:
            if (raw.subnet, raw.value) not in self._warned:
                self._warned.add((raw.subnet, raw.value))
                log.warning("skipping malformed lease from another node: %s (value %r)",
                            exc, raw.value[:200])
            return None

    def _publish(self) -> None:
        """Recompute the peer set; hand it out if it changed."""
        own = self._own_subnet()
        peers = {s: le for s, le in self.leases.items()
                 if s != own and le.attrs.backend_type == self._backend_type}
        diff = diff_leases(self.peers, peers)
        if not diff and self.synced:
            return
        for le in diff.added:
            log.info("peer added: %s at %s", le.subnet, le.attrs.public_ip)
        for le in diff.changed:
            log.info("peer changed: %s at %s", le.subnet, le.attrs.public_ip)
        for s in diff.removed:
            log.info("peer removed: %s", s)
        self.peers = peers
        self._on_peers(dict(peers))

    def reset(self, raws: tuple[RawLease, ...], cursor: int) -> None:
        """Replace the table with a full listing (snapshot or re-list after a resync)."""
        table: dict[Subnet, Lease] = {}
        for raw in raws:
            le = self._decode(raw)
            if le is not None:
                table[raw.subnet] = le
        self.leases = table
        self.cursor = cursor
        self._publish()
        self.synced = True
        own = self._own_subnet()
        if own is not None and not self._still_ours(own):
            self._on_own_lease_lost()

    def _still_ours(self, own: Subnet) -> bool:
        """Our subnet's key exists and names our PublicIP (if we know it). A key
        that another node overwrote is as lost as a deleted one."""
        le = self.leases.get(own)
        if le is None:
            return False
        ip = self._own_public_ip()
        return ip is None or le.attrs.public_ip == ip

    def apply(self, events: tuple[WatchEvent, ...], cursor: int) -> None:
        """Fold watch events into the table."""
        own = self._own_subnet()
        lost = False
        for ev in events:
            if ev.value is None:
                self.leases.pop(ev.subnet, None)
                lost = lost or ev.subnet == own
                continue
            le = self._decode(RawLease(ev.subnet, ev.value, ev.expiration))
            if le is not None:
                self.leases[ev.subnet] = le
                lost = lost or (ev.subnet == own and not self._still_ours(own))
        self.cursor = cursor
        self._publish()
        if lost:
            self._on_own_lease_lost()

    def own_subnet_changed(self) -> None:
        """Our lease moved to another subnet: the old one may be a peer now, the new
        one is not; hand out the corrected set at once."""
        if self.synced:
            self._publish()

    def set_backend_type(self, backend_type: BackendType) -> None:
        """A live backend switch: from now on hand out peers of ``backend_type`` (flannel
        ignores leases of another backend); the new peer set goes out at once."""
        if backend_type == self._backend_type:
            return
        self._backend_type = backend_type
        if self.synced:
            self._publish()

    # ---- the loop ------------------------------------------------------------------------
    async def relist(self) -> None:
        """Take a full snapshot now (run() does this first unless already synced)."""
        snap = await self._registry.list_leases()
        self.reset(snap.leases, snap.cursor)

    async def run(self) -> None:
        """Forever: keep the table in sync, backing off while etcd is away. A watcher
        that already holds a snapshot resumes from its cursor."""
        need_list = not self.synced
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                elif not self.connected:
                    # After a failure a cheap read first: etcd being back is noticed (and
                    # said) at once, not after a quiet watch of up to watch_timeout s; the
                    # next round watches from the cursor, so no event is skipped.
                    await self._registry.get_config()
                else:
                    batch = await self._registry.watch_leases(self.cursor, self._watch_timeout)
                    if batch.events or batch.cursor != self.cursor:
                        self.apply(batch.events, batch.cursor)
                    else:
                        # A quiet watch looks the same as a hung etcd (SIGSTOP, partition):
                        # one cheap read tells them apart, so `connected` stays true.
                        await self._registry.get_config()
                if not self.connected:
                    if self.backoff.failing_since is not None:
                        self.reconnects += 1
                        log.info("etcd reachable again after %.1f s",
                                 self.backoff.failing_for(self._clock()))
                    self.connected = True
                self.backoff.success()
            except ResyncRequired as exc:
                self.resyncs += 1
                log.info("watch cursor too old, re-listing leases (%s)", exc)
                need_list = True
            except RegistryUnavailable as exc:
                delay = self.backoff.failure(self._clock())
                if self.connected or self.backoff.attempts == 1:
                    log.warning("etcd unreachable, keeping the last %d peers: %s",
                                len(self.peers), exc)
                self.connected = False
                await self._sleep(delay)
