"""The Registry over etcd's v2 API, through python-etcd.

python-etcd is synchronous: every call runs in a worker thread
(``asyncio.to_thread``) with a finite timeout, so the event loop and the
packet engine never wait on etcd. Watch: ``waitIndex`` cursor; etcd's error
401 (EventIndexCleared) becomes ResyncRequired.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import etcd
import urllib3.exceptions

from control.errors import RegistryError, RegistryUnavailable, ResyncRequired
from control.lease import RawLease, parse_key, subnet_key, subnets_dir
from control.registry import ConfigEvent, EtcdOptions, LeaseSnapshot, WatchBatch, WatchEvent

T = TypeVar("T")
_REMOVED = frozenset({"delete", "expire", "compareAndDelete"})
# Anything etcd or the HTTP layer throws at us (refused, timed out, raft busy) is
# "etcd is away": the caller backs off and retries.
_CONNECTION_ERRORS = (etcd.EtcdException, urllib3.exceptions.HTTPError, OSError)
# An answer python-etcd or we cannot decode (a non-UTF-8 error body, an index that is
# no integer, a node that is no object: something else on etcd's port) is "etcd is
# away" too, never an exception out of the registry (found by tests/fuzz).
_MALFORMED_ANSWER = (ValueError, TypeError, KeyError, AttributeError)


def parse_expiration(text: str | None) -> float | None:
    """etcd's RFC 3339 expiry with nanoseconds -> unix seconds."""
    if not text:
        return None
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if m is None:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.datetime.fromisoformat(f"{m.group(1)}{frac}{tz}").timestamp()
    except ValueError:  # matches the pattern but is no date: month 13, hour 25, ...
        return None


def _reason(exc: BaseException) -> str:
    """The root cause of a python-etcd/urllib3 error, not its nested reprs."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if m:
        return m.group(0)
    if "timed out" in text.lower():
        return "timed out"
    return text[:200]


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call in a daemon thread and await its result.

    Not ``asyncio.to_thread``: a pending long-poll watch in the default executor
    would hold up the loop's shutdown (and the interpreter's exit) for its whole
    timeout. A daemon thread is simply abandoned when we stop.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(deliver, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=work, name="etcd-v2", daemon=True).start()
    return await future


class EtcdV2Registry:
    """Leases and config in etcd's v2 key space."""

    api = "v2"

    def __init__(self, options: EtcdOptions) -> None:
        self._options = options
        self._hosts = options.hosts()
        self._current = 0
        self._clients: dict[tuple[int, float], etcd.Client] = {}

    # ---- plumbing ------------------------------------------------------------------------
    def _client(self, read_timeout: float) -> etcd.Client:
        """One client per (endpoint, timeout): the watch's long timeout stays separate."""
        key = (self._current, read_timeout)
        client = self._clients.get(key)
        if client is None:
            scheme, host, port = self._hosts[self._current]
            o = self._options
            cert: tuple[str, str] | str | None = None
            if o.certfile and o.keyfile:
                cert = (o.certfile, o.keyfile)
            elif o.certfile:
                cert = o.certfile
            client = etcd.Client(
                host=host, port=port, protocol=scheme, read_timeout=read_timeout,
                cert=cert, ca_cert=o.cafile or None, username=o.username or None,
                password=o.password or None, allow_reconnect=False)
            # One attempt per call, as long as its timeout. urllib3 otherwise retries a
            # timed-out GET three more times (a hung etcd noticed after 4x the timeout),
            # and wraps the read timeout of a long poll still waiting for its headers (a
            # slow etcd) in MaxRetryError, which python-etcd then reports as a failed
            # connection instead of a watch that timed out quietly.
            client.http.connection_pool_kw["retries"] = False
            self._clients[key] = client
        return client

    async def _call(self, fn: Callable[[etcd.Client], T], timeout: float | None = None) -> T:
        """Run ``fn(client)`` in a thread; connection trouble -> RegistryUnavailable
        (and the next call tries the next endpoint). Only a failure at the current
        endpoint moves on: the watches and probes run side by side, and the second of
        two calls failing at a dead member must not skip the member just failed over to."""
        read_timeout = self._options.timeout if timeout is None else timeout
        index = self._current
        client = self._client(read_timeout)  # here, not in the thread: at ``index``

        def run() -> T:
            return fn(client)
        try:
            return await _in_daemon_thread(run)
        except _CONNECTION_ERRORS as exc:
            self._failed(index)
            raise RegistryUnavailable(f"etcd v2 at {self._endpoint(index)}: {_reason(exc)}"
                                      ) from None
        except _MALFORMED_ANSWER as exc:
            self._failed(index)
            raise RegistryUnavailable(f"etcd v2 at {self._endpoint(index)}: malformed answer "
                                      f"({type(exc).__name__}: {_reason(exc)})") from None

    def _failed(self, index: int) -> None:
        """A call at endpoint ``index`` failed: the next call goes to the one after it
        (unless another call has moved on already)."""
        if self._current == index:
            self._current = (index + 1) % len(self._hosts)

    def _endpoint(self, index: int) -> str:
        scheme, host, port = self._hosts[index]
        return f"{scheme}://{host}:{port}"

    def _key(self, subnet: ipaddress.IPv4Network) -> str:
        return subnet_key(self._options.prefix, subnet)

    # ---- Registry ------------------------------------------------------------------------
    async def get_config(self) -> str | None:
        key = f"{self._options.prefix.rstrip('/')}/config"

        def read(c: etcd.Client) -> str | None:
            try:
                return str(c.read(key).value)
            except etcd.EtcdKeyNotFound:
                return None
            except etcd.EtcdConnectionFailed:
                raise
            except etcd.EtcdException as exc:
                if "404" in str(exc) or "Not Found" in str(exc):
                    raise RegistryError("this etcd does not serve the v2 API "
                                        "(start it with --enable-v2=true)") from None
                raise RegistryError(f"reading {key}: {exc}") from None
        return await self._call(read)

    async def list_leases(self) -> LeaseSnapshot:
        directory = subnets_dir(self._options.prefix)

        def read(c: etcd.Client) -> LeaseSnapshot:
            try:
                res = c.read(directory, recursive=True)
            except etcd.EtcdKeyNotFound:
                # No lease yet: the cursor is the index of any read.
                idx = c.read("/", recursive=False).etcd_index
                return LeaseSnapshot((), int(idx))
            leases = []
            for node in res.leaves:
                if node.dir or node.key == directory:
                    continue
                subnet = parse_key(node.key)
                if subnet is None or node.value is None:
                    continue
                leases.append(RawLease(subnet, str(node.value), parse_expiration(node.expiration)))
            return LeaseSnapshot(tuple(leases), int(res.etcd_index))
        return await self._call(read)

    async def create_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                           ) -> float | None:
        key = self._key(subnet)

        def write(c: etcd.Client) -> float | None:
            try:
                res = c.write(key, value, ttl=ttl, prevExist=False)
            except etcd.EtcdAlreadyExist:
                return None
            return parse_expiration(res.expiration) or time.time() + ttl
        return await self._call(write)

    async def put_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int) -> float:
        key = self._key(subnet)

        def write(c: etcd.Client) -> float:
            res = c.write(key, value, ttl=ttl)
            return parse_expiration(res.expiration) or time.time() + ttl
        return await self._call(write)

    async def renew_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                          ) -> float | None:
        key = self._key(subnet)

        def write(c: etcd.Client) -> float | None:
            try:
                res = c.write(key, value, ttl=ttl, prevValue=value)
            except (etcd.EtcdKeyNotFound, etcd.EtcdCompareFailed):
                return None
            return parse_expiration(res.expiration) or time.time() + ttl
        return await self._call(write)

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        key = self._key(subnet)

        def delete(c: etcd.Client) -> None:
            with contextlib.suppress(etcd.EtcdKeyNotFound):
                c.delete(key)
        await self._call(delete)

    async def watch_leases(self, cursor: int, timeout: float) -> WatchBatch:
        directory = subnets_dir(self._options.prefix)

        def wait(c: etcd.Client) -> WatchBatch:
            try:
                res: Any = c.read(directory, wait=True, recursive=True, waitIndex=cursor + 1,
                                  timeout=timeout)
            except etcd.EtcdWatchTimedOut:
                return WatchBatch((), cursor)
            except etcd.EtcdEventIndexCleared as exc:
                raise ResyncRequired(f"etcd v2 event index {cursor + 1} cleared: {exc}"
                                     ) from None
            index = int(res.modifiedIndex)
            subnet = parse_key(str(res.key))
            if subnet is None or res.dir:
                return WatchBatch((), index)
            if res.action in _REMOVED:
                return WatchBatch((WatchEvent(subnet, None),), index)
            return WatchBatch((WatchEvent(subnet, str(res.value),
                                          parse_expiration(res.expiration)),), index)
        return await self._call(wait, timeout=timeout + self._options.timeout)

    # ---- ConfigWatch (live reconfiguration) --------------------------------------------
    async def get_config_rev(self) -> tuple[str | None, int]:
        key = f"{self._options.prefix.rstrip('/')}/config"

        def read(c: etcd.Client) -> tuple[str | None, int]:
            try:
                res = c.read(key)
            except etcd.EtcdKeyNotFound:
                return None, int(c.read("/", recursive=False).etcd_index)
            return str(res.value), int(res.etcd_index)
        return await self._call(read)

    async def watch_config(self, cursor: int, timeout: float) -> ConfigEvent:
        key = f"{self._options.prefix.rstrip('/')}/config"

        def wait(c: etcd.Client) -> ConfigEvent:
            try:
                res: Any = c.read(key, wait=True, waitIndex=cursor + 1, timeout=timeout)
            except etcd.EtcdWatchTimedOut:
                return ConfigEvent(False, None, cursor)
            except etcd.EtcdEventIndexCleared as exc:
                raise ResyncRequired(f"etcd v2 event index {cursor + 1} cleared: {exc}"
                                     ) from None
            index = int(res.modifiedIndex)
            if res.action in _REMOVED:
                return ConfigEvent(True, None, index)
            return ConfigEvent(True, str(res.value), index)
        return await self._call(wait, timeout=timeout + self._options.timeout)

    async def close(self) -> None:
        for client in self._clients.values():
            pool = getattr(client, "http", None)
            if pool is not None:
                pool.clear()
        self._clients.clear()
