"""Holding our lease: acquire in flannel's order, renew before expiry, re-acquire.

Unlike flanneld, a lost create race is retried (re-list, plan again without
the subnet we lost), and a lease that disappears under us (deleted by hand,
expired while etcd was away) is taken again, preferring the same subnet, while
the dataplane keeps forwarding. Decisions come from the pure control.lease;
this module only sequences registry calls and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable

from control.backoff import Backoff
from control.config import NetworkConfig
from control.errors import AllocationError, LeaseValueError, RegistryUnavailable
from control.lease import (
    LEASE_TTL,
    RENEW_MARGIN,
    Lease,
    LeaseAttrs,
    decode_lease,
    encode_attrs,
    plan_acquire,
    renew_at,
)
from control.registry import Registry

log = logging.getLogger("flannelette.lease")

MAX_RACES = 20  # lost create races in a row before backing off


def _once(backoff: Backoff, msg: str, *args: object) -> None:
    """A warning for the first failure of a streak; its retries only at debug level
    (one line per state change, not one per retry while etcd is away)."""
    log.log(logging.WARNING if backoff.attempts <= 1 else logging.DEBUG, msg, *args)


class LeaseKeeper:
    """Owns our lease. ``lease``/``expires_at`` are what /status reports."""

    def __init__(self, registry: Registry, config: NetworkConfig, attrs: LeaseAttrs, *,
                 preferred: Callable[[], list[ipaddress.IPv4Network]] = list,
                 ttl: int = LEASE_TTL, margin: float = RENEW_MARGIN,
                 clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 backoff: Backoff | None = None, rng: random.Random | None = None,
                 on_acquired: Callable[[Lease], None] | None = None) -> None:
        self._registry = registry
        self._config = config
        self.attrs = attrs
        self._value = encode_attrs(attrs)
        self._preferred = preferred
        self._ttl = ttl
        self._margin = margin
        self._clock = clock
        self._sleep = sleep
        self.backoff = backoff or Backoff(base=0.5, cap=60.0)
        self._rng = rng or random.Random()
        self._on_acquired = on_acquired
        self.lease: Lease | None = None
        self.expires_at: float | None = None
        self.renewals = 0
        self.reacquisitions = 0
        self._lost = asyncio.Event()

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        return self.lease.subnet if self.lease is not None else None

    def lost(self) -> None:
        """Called by the watch when our key vanished: re-acquire now, not at renewal."""
        self._lost.set()

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` (injected sleep), cut short by :meth:`lost`."""
        if self._lost.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Cancel without awaiting: awaiting here could swallow our own cancellation.
            sleeper.cancel()
            waker.cancel()

    async def _try_acquire(self, prefer: list[ipaddress.IPv4Network]) -> Lease | None:
        """One listing and up to MAX_RACES creates; None when every race was lost."""
        snap = await self._registry.list_leases()
        leases = []
        for raw in snap.leases:
            with contextlib.suppress(LeaseValueError):
                leases.append(decode_lease(raw))
        lost: list[ipaddress.IPv4Network] = []
        for _ in range(MAX_RACES):
            plan = plan_acquire(self._config, leases, self.attrs.public_ip, prefer,
                                self._rng, exclude=lost)
            for stale in plan.stale:
                log.info("deleting our old lease %s: it does not fit the network config", stale)
                await self._registry.delete_lease(stale)
            if plan.reuse:
                expires = await self._registry.put_lease(plan.subnet, self._value, self._ttl)
                log.info("lease reused: %s (PublicIP %s)", plan.subnet, self.attrs.public_ip)
            else:
                got = await self._registry.create_lease(plan.subnet, self._value, self._ttl)
                if got is None:
                    log.info("lost the race for %s to another node, trying again", plan.subnet)
                    lost.append(plan.subnet)
                    continue
                expires = got
                log.info("lease acquired: %s (PublicIP %s)", plan.subnet, self.attrs.public_ip)
            self.expires_at = expires
            return Lease(plan.subnet, self.attrs, expires)
        return None

    async def acquire(self) -> Lease:
        """Hold a lease, however long etcd takes; AllocationError if none is free."""
        while True:
            prefer = ([self.lease.subnet] if self.lease else []) + self._preferred()
            try:
                lease = await self._try_acquire(prefer)
            except RegistryUnavailable as exc:
                delay = self.backoff.failure(self._clock())
                _once(self.backoff, "cannot reach etcd to acquire a lease (retrying in %.1f s): "
                      "%s", delay, exc)
                await self._sleep(delay)
                continue
            except AllocationError as exc:
                delay = self.backoff.failure(self._clock())
                log.error("%s; retrying in %.1f s", exc, delay)
                await self._sleep(delay)
                continue
            if lease is None:
                await self._sleep(self.backoff.failure(self._clock()))
                continue
            self.backoff.success()
            self._lost.clear()
            self.lease = lease
            if self._on_acquired is not None:
                self._on_acquired(lease)
            return lease

    async def republish(self, attrs: LeaseAttrs, config: NetworkConfig | None = None) -> None:
        """A live backend switch: write our lease again with new attributes (BackendType,
        VNI, VtepMAC) and keep renewing that value. If etcd is away, the lease is
        re-acquired (the reuse rule rewrites it) as soon as etcd answers."""
        if config is not None:
            self._config = config
        if attrs == self.attrs:
            return
        self.attrs = attrs
        self._value = encode_attrs(attrs)
        if self.lease is None:
            return
        try:
            expires = await self._registry.put_lease(self.lease.subnet, self._value, self._ttl)
        except RegistryUnavailable as exc:
            log.warning("cannot publish the new lease value now (%s); retrying", exc)
            self._lost.set()
            return
        self.expires_at = expires
        self.lease = Lease(self.lease.subnet, attrs, expires)
        log.info("lease %s re-published: %s", self.lease.subnet, self._value)

    async def run(self) -> None:
        """Forever: renew ``margin`` before expiry; re-acquire when the lease is gone."""
        while True:
            assert self.lease is not None and self.expires_at is not None
            now = self._clock()
            if self._lost.is_set():
                log.warning("our lease %s disappeared from etcd; acquiring again",
                            self.lease.subnet)
                await self.acquire()
                self.reacquisitions += 1
                continue
            due = renew_at(self.expires_at, self._margin, now)
            if due > now:
                await self._wait(due - now)
                continue
            try:
                expires = await self._registry.renew_lease(self.lease.subnet, self._value,
                                                           self._ttl)
            except RegistryUnavailable as exc:
                delay = min(60.0, self.backoff.failure(self._clock()))
                _once(self.backoff, "lease renewal failed (retrying in %.1f s): %s", delay, exc)
                await self._wait(delay)
                continue
            self.backoff.success()
            if expires is None:
                self._lost.set()
                continue
            self.expires_at = expires
            self.lease = Lease(self.lease.subnet, self.attrs, expires)
            self.renewals += 1
            log.info("lease renewed: %s until %.0f", self.lease.subnet, expires)
