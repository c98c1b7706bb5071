"""Test doubles for the control plane: a fake clock and an in-memory registry.

They live under tests/, never in the product. The registry behaves like etcd
where the control logic can tell: atomic create, TTL expiry on the fake clock,
an event history with a limited window (EventIndexCleared / compaction), and
an "away" switch that makes every call raise RegistryUnavailable.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import ipaddress
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from control.errors import RegistryUnavailable, ResyncRequired
from control.lease import RawLease
from control.registry import LeaseSnapshot, WatchBatch, WatchEvent


@dataclass
class FakeClock:
    """Time that moves only when someone sleeps (or the test advances it)."""

    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(0.0, delay)
        await asyncio.sleep(0)

    def advance(self, delay: float) -> None:
        self.now += delay


@dataclass
class _Entry:
    value: str
    expires: float | None


@dataclass
class InMemoryRegistry:
    """Shared by many "nodes" in one test: each node gets this same object."""

    clock: FakeClock
    config: str | None = None
    window: int = 1000
    api: str = "fake"
    away: bool = False
    calls: int = 0
    _kv: dict[ipaddress.IPv4Network, _Entry] = field(default_factory=dict)
    _history: list[tuple[int, WatchEvent]] = field(default_factory=list)
    _index: int = 1

    def _check(self) -> None:
        self.calls += 1
        if self.away:
            raise RegistryUnavailable("fake etcd is away")
        self._expire()

    def _record(self, ev: WatchEvent) -> None:
        self._index += 1
        self._history.append((self._index, ev))
        del self._history[:-self.window]

    def _expire(self) -> None:
        for subnet, entry in list(self._kv.items()):
            if entry.expires is not None and entry.expires <= self.clock.now:
                del self._kv[subnet]
                self._record(WatchEvent(subnet, None))

    # ---- test helpers --------------------------------------------------------------------
    def set(self, subnet: ipaddress.IPv4Network, value: str, ttl: float | None = None) -> None:
        """Write a key as another node (or etcdctl) would."""
        expires = None if ttl is None else self.clock.now + ttl
        self._kv[subnet] = _Entry(value, expires)
        self._record(WatchEvent(subnet, value, expires))

    def remove(self, subnet: ipaddress.IPv4Network) -> None:
        if self._kv.pop(subnet, None) is not None:
            self._record(WatchEvent(subnet, None))

    def value(self, subnet: ipaddress.IPv4Network) -> str | None:
        self._expire()
        entry = self._kv.get(subnet)
        return None if entry is None else entry.value

    def subnets(self) -> builtins.set[ipaddress.IPv4Network]:
        self._expire()
        return set(self._kv)

    # ---- Registry ------------------------------------------------------------------------
    async def get_config(self) -> str | None:
        self._check()
        return self.config

    async def list_leases(self) -> LeaseSnapshot:
        self._check()
        await asyncio.sleep(0)
        raws = tuple(RawLease(s, e.value, e.expires) for s, e in self._kv.items())
        return LeaseSnapshot(raws, self._index)

    async def create_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                           ) -> float | None:
        self._check()
        await asyncio.sleep(0)  # let racing nodes interleave
        self._expire()
        if subnet in self._kv:
            return None
        self.set(subnet, value, ttl)
        return self.clock.now + ttl

    async def put_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int) -> float:
        self._check()
        self.set(subnet, value, ttl)
        return self.clock.now + ttl

    async def renew_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                          ) -> float | None:
        self._check()
        entry = self._kv.get(subnet)
        if entry is None or entry.value != value:
            return None
        self.set(subnet, value, ttl)
        return self.clock.now + ttl

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        self._check()
        self.remove(subnet)

    async def watch_leases(self, cursor: int, timeout: float) -> WatchBatch:
        self._check()
        events = self._since(cursor)
        if not events:
            await self.clock.sleep(min(timeout, 1.0))
            self._check()
            events = self._since(cursor)
        return WatchBatch(events, self._index if events else cursor)

    def _since(self, cursor: int) -> tuple[WatchEvent, ...]:
        if self._history and cursor + 1 < self._history[0][0] and cursor < self._index:
            raise ResyncRequired(f"index {cursor + 1} cleared")
        return tuple(ev for idx, ev in self._history if idx > cursor)

    async def close(self) -> None:
        return None


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function on a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return wrapper
