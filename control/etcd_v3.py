"""The Registry over etcd's v3 API, through aetcd (asyncio, gRPC).

Leases as flannel >= 0.18 writes them: grant an etcd lease, then a transaction
``If(Version(key) == 0) Then(Put(key, value, lease))``; renewal grants a fresh
lease and rewrites the value (only while the key still holds our value). The
watch keeps one stream open from ``cursor + 1`` and hands out what arrived
within the timeout; compaction becomes ResyncRequired. Any other error drops
the client; the next call connects afresh, to the next endpoint. Only a failure
of the current client drops it: the lease watch, the config watch and the
probes share one client, and a second failure seen from the same dead member
(or from a stream that the drop itself closed) must not throw away the client
of the member just failed over to, nor skip that member. TLS
(--etcd-cafile/certfile/keyfile, https:// endpoints) uses a gRPC TLS channel
under aetcd's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import weakref
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rtypes
import grpc  # type: ignore[import-untyped]
from aetcd import rpc as aetcd_rpc
from aetcd import watcher as aetcd_watcher

from control.errors import FlagError, RegistryUnavailable, ResyncRequired
from control.lease import RawLease, parse_key, subnet_key, subnets_dir
from control.registry import ConfigEvent, EtcdOptions, LeaseSnapshot, WatchBatch, WatchEvent

_END = object()  # the watch stream ended
# Each client's channel gets its own subchannels. gRPC otherwise shares them across
# channels to the same address, with their reconnect backoff: after etcd answered
# garbage or nothing for a while, a new client waited out the old one's backoff
# (seconds, growing with the outage) before it even tried the etcd that was back.
_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def _consume(task: asyncio.Future[Any]) -> None:
    """Done-callback of an abandoned task: fetch its outcome so nothing is logged."""
    if not task.cancelled():
        task.exception()


async def _bounded(aw: Any, timeout: float) -> Any:
    """``aw`` with a deadline that holds even if it ignores cancellation: a gRPC call
    on a stalled connection can, and ``asyncio.wait_for`` waits for the cancellation
    to finish. On timeout (TimeoutError) it is cancelled and left to end on its own."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_consume)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError(f"no answer in {timeout:g} s")
    if task.cancelled():
        # Not our cancellation (that arrives in the wait above): gRPC cancels the calls
        # of a channel that another task closed. A CancelledError from here would end
        # the caller's task as if it had been stopped.
        raise ConnectionAbortedError("call cancelled: its etcd client was closed")
    return task.result()


class _Stream:
    """One open watch: a task pumping aetcd's iterator into a queue we can wait on."""

    def __init__(self, watch: Any, start: int, client: Any = None) -> None:
        self.watch = watch
        self.start = start
        self.client = client  # the aetcd client it was opened on
        self.closed = False  # closed by us (a drop, or close()), not ended by etcd
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for event in self.watch:
                self.queue.put_nowait(event)
        except Exception as exc:
            self.queue.put_nowait(exc)
        finally:  # also when gRPC cancels the stream of a closed client
            self.queue.put_nowait(_END)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await _bounded(self.watch.cancel(), 2.0)
        self.task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await _bounded(asyncio.shield(self.task), 2.0)
        self.queue.put_nowait(_END)  # wakes a caller still waiting on this stream


def _read(path: str, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise FlagError(f"{flag} {path}: {exc.strerror}") from None


def _credentials(options: EtcdOptions) -> grpc.ChannelCredentials:
    """gRPC TLS credentials from --etcd-cafile/--etcd-certfile/--etcd-keyfile."""
    if bool(options.certfile) != bool(options.keyfile):
        raise FlagError("--etcd-certfile and --etcd-keyfile go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(options.cafile, "--etcd-cafile"),
        private_key=_read(options.keyfile, "--etcd-keyfile"),
        certificate_chain=_read(options.certfile, "--etcd-certfile"))


class _TlsClient(aetcd.Client):  # type: ignore[misc]
    """aetcd.Client over a TLS channel (aetcd itself only opens plaintext ones)."""

    credentials: grpc.ChannelCredentials | None = None
    _is_connecting: bool

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = aetcd_rpc.secure_channel(target, self.credentials,
                                                    options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd_rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    aetcd_rpc.AuthenticateRequest(name=self._username,
                                                  password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = aetcd_rpc.KVStub(self.channel)
            self.clusterstub = aetcd_rpc.ClusterStub(self.channel)
            self.leasestub = aetcd_rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd_rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd_watcher.Watcher(aetcd_rpc.WatchStub(self.channel),
                                                  timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


class EtcdV3Registry:
    """Leases and config in etcd's v3 key space."""

    api = "v3"

    def __init__(self, options: EtcdOptions) -> None:
        self._credentials = _credentials(options) if options.tls else None
        self._options = options
        self._hosts = options.hosts()
        self._current = 0
        self._client: aetcd.Client | None = None
        self._endpoint_of: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._stream: _Stream | None = None
        self._config_stream: _Stream | None = None
        self._prefix = subnets_dir(options.prefix).encode() + b"/"

    async def _connect(self) -> aetcd.Client:
        if self._client is None:
            _, host, port = self._hosts[self._current]
            o = self._options
            cls = _TlsClient if self._credentials is not None else aetcd.Client
            client = cls(host=host, port=port, username=o.username or None,
                         password=o.password or None, timeout=o.timeout,
                         connect_wait_timeout=o.timeout, options=dict(_CHANNEL_OPTIONS))
            if isinstance(client, _TlsClient):
                client.credentials = self._credentials
            self._endpoint_of[client] = f"{host}:{port}"
            self._client = client
        return self._client

    async def _release(self) -> None:
        """Close both watch streams and the client."""
        client, self._client = self._client, None
        # Both taken before the first await: a stream opened meanwhile is the next one's.
        streams = (self._stream, self._config_stream)
        self._stream = self._config_stream = None
        for stream in streams:
            if stream is not None:
                await stream.close()
        if client is not None:
            with contextlib.suppress(Exception):
                await _bounded(client.close(), 2.0)

    async def _drop(self) -> None:
        """Forget the client and the streams (after an error); the next call reconnects,
        to the next endpoint."""
        await self._release()
        self._current = (self._current + 1) % len(self._hosts)

    async def _failed(self, client: Any) -> None:
        """A call or stream on ``client`` failed: drop it if it is still the current
        client. Otherwise another call saw the failure first and dropped it; the
        client now in place (maybe already the next member's) stays."""
        if client is self._client:
            await self._drop()

    def _unavailable(self, exc: BaseException, client: Any = None) -> RegistryUnavailable:
        where = self._endpoint_of.get(client) if client is not None else None
        if where is None:
            _, host, port = self._hosts[self._current]
            where = f"{host}:{port}"
        return RegistryUnavailable(f"etcd v3 at {where}: {str(exc) or type(exc).__name__}")

    def _key(self, subnet: ipaddress.IPv4Network) -> bytes:
        return subnet_key(self._options.prefix, subnet).encode()

    async def _guard(self, coro: Any, client: Any) -> Any:
        """Await an aetcd call made on ``client`` with a deadline; any failure ->
        RegistryUnavailable (and the client dropped, if still current)."""
        try:
            return await _bounded(coro, self._options.timeout + 1.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = self._unavailable(exc, client)
            await self._failed(client)
            raise err from None

    # ---- Registry ------------------------------------------------------------------------
    async def get_config(self) -> str | None:
        key = f"{self._options.prefix.rstrip('/')}/config".encode()
        client = await self._connect()
        res = await self._guard(client.get(key), client)
        return None if res is None else bytes(res.value).decode("utf-8", "replace")

    async def list_leases(self) -> LeaseSnapshot:
        client = await self._connect()
        res = await self._guard(client.get_prefix(self._prefix), client)
        leases = []
        for kv in res.kvs:
            subnet = parse_key(bytes(kv.key).decode("utf-8", "replace"))
            if subnet is not None:
                leases.append(RawLease(subnet, bytes(kv.value).decode("utf-8", "replace")))
        return LeaseSnapshot(tuple(leases), int(res.header.revision))

    async def _put_if(self, key: bytes, compare: Any, value: str, ttl: int) -> float | None:
        client = await self._connect()
        lease = await self._guard(client.lease(ttl), client)
        ok, _ = await self._guard(client.transaction(
            compare=[compare], success=[client.transactions.put(key, value.encode(),
                                                                 lease=lease.id)],
            failure=[]), client)
        if not ok:
            with contextlib.suppress(RegistryUnavailable):
                await self._guard(client.revoke_lease(lease.id), client)
            return None
        return time.time() + int(lease.ttl)

    async def create_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                           ) -> float | None:
        key = self._key(subnet)
        client = await self._connect()
        return await self._put_if(key, client.transactions.version(key) == 0, value, ttl)

    async def put_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int) -> float:
        client = await self._connect()
        lease = await self._guard(client.lease(ttl), client)
        await self._guard(client.put(self._key(subnet), value.encode(), lease=lease.id), client)
        return time.time() + int(lease.ttl)

    async def renew_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                          ) -> float | None:
        key = self._key(subnet)
        client = await self._connect()
        return await self._put_if(key, client.transactions.value(key) == value.encode(),
                                  value, ttl)

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        client = await self._connect()
        await self._guard(client.delete(self._key(subnet)), client)

    async def _open_watch(self, key: bytes, start: int, *, prefix: bool = False) -> _Stream:
        """Open a watch of ``key`` (or every key under it) from revision ``start``."""
        client = await self._connect()
        call = client.watch_prefix if prefix else client.watch
        try:
            watch = await _bounded(call(key, start_revision=start), self._options.timeout + 1.0)
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise ResyncRequired(f"etcd v3 revision {start} compacted: {exc}") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = self._unavailable(exc, client)
            await self._failed(client)
            raise err from None
        return _Stream(watch, start, client)

    async def watch_leases(self, cursor: int, timeout: float) -> WatchBatch:
        stream = self._stream
        if stream is None or stream.start > cursor + 1:
            if stream is not None:
                await stream.close()
            stream = self._stream = await self._open_watch(self._prefix, cursor + 1,
                                                           prefix=True)
        items: list[Any] = []
        try:
            items.append(await asyncio.wait_for(stream.queue.get(), timeout))
        except TimeoutError:
            return WatchBatch((), cursor)
        while not stream.queue.empty():
            items.append(stream.queue.get_nowait())
        events: list[WatchEvent] = []
        for item in items:
            if item is _END or isinstance(item, BaseException):
                # Closed by a drop (another call failed over): nothing to report, the
                # next call opens a stream on the current client from the cursor.
                ours = stream.closed or stream.client is not self._client
                if self._stream is stream:
                    self._stream = None
                await stream.close()
                if isinstance(item, aetcd.exceptions.RevisionCompactedError):
                    raise ResyncRequired(f"etcd v3 watch compacted: {item}")
                if events or ours:  # hand out what we have; the next call re-opens
                    break
                err = self._unavailable(item if isinstance(item, BaseException)
                                        else RuntimeError("watch stream ended"), stream.client)
                await self._failed(stream.client)
                raise err
            kv = item.kv
            rev = int(kv.mod_revision)
            if rev <= cursor:
                continue
            cursor = rev
            subnet = parse_key(bytes(kv.key).decode("utf-8", "replace"))
            if subnet is None:
                continue
            if item.kind == aetcd.rtypes.EventKind.DELETE:
                events.append(WatchEvent(subnet, None))
            else:
                events.append(WatchEvent(subnet, bytes(kv.value).decode("utf-8", "replace")))
        if self._stream is not None:
            self._stream.start = cursor + 1  # what a re-open would ask for
        return WatchBatch(tuple(events), cursor)

    # ---- ConfigWatch (live reconfiguration) --------------------------------------------
    def _config_key(self) -> bytes:
        return f"{self._options.prefix.rstrip('/')}/config".encode()

    async def _close_config_stream(self) -> None:
        stream, self._config_stream = self._config_stream, None
        if stream is not None:
            await stream.close()

    async def get_config_rev(self) -> tuple[str | None, int]:
        key = self._config_key()
        client = await self._connect()
        res = await self._guard(client.get_range(key, key + b"\0"), client)
        value = None
        for kv in res.kvs:
            value = bytes(kv.value).decode("utf-8", "replace")
        return value, int(res.header.revision)

    async def watch_config(self, cursor: int, timeout: float) -> ConfigEvent:
        stream = self._config_stream
        if stream is None or stream.start != cursor + 1:
            await self._close_config_stream()
            stream = self._config_stream = await self._open_watch(self._config_key(),
                                                                  cursor + 1)
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), timeout)
            except TimeoutError:
                return ConfigEvent(False, None, cursor)
            if item is _END or isinstance(item, BaseException):
                ours = stream.closed or stream.client is not self._client
                if self._config_stream is stream:
                    self._config_stream = None
                await stream.close()
                if isinstance(item, aetcd.exceptions.RevisionCompactedError):
                    raise ResyncRequired(f"etcd v3 config watch compacted: {item}")
                if ours:  # closed by a drop: no change seen; the next call re-opens
                    return ConfigEvent(False, None, cursor)
                err = self._unavailable(item if isinstance(item, BaseException)
                                        else RuntimeError("config watch stream ended"),
                                        stream.client)
                await self._failed(stream.client)
                raise err
            rev = int(item.kv.mod_revision)
            if rev <= cursor:
                continue
            stream.start = rev + 1  # one event per call; the stream stays open
            if item.kind == aetcd.rtypes.EventKind.DELETE:
                return ConfigEvent(True, None, rev)
            return ConfigEvent(True, bytes(item.kv.value).decode("utf-8", "replace"), rev)

    async def close(self) -> None:
        await self._release()
