"""Several engine processes behind one Engine-like object: ``--workers N``.

:class:`EnginePool` runs N fresh interpreters (``python -m dataplane.worker``, never a
fork: the agent has threads), each one :class:`~dataplane.engine.Engine` with
``shared_devices=True``: one queue of the multi-queue TUN (the kernel picks a queue
per flow), one ``SO_REUSEPORT`` socket on PublicIP:8472 (the kernel picks a socket
per outer 4-tuple) and one queue of the tunnel-GSO TAP. The parent holds one more,
*detached* TUN queue, so the device and its routes outlive any worker.

Parent and worker talk over a socketpair in length-prefixed messages (a 4-byte
big-endian length, then a pickle of plain dicts, lists, strings, bytes and numbers;
the unpickler refuses every class). Nothing crosses it per packet: peer sets go to
every worker, each worker pushes its counters (and new flight-recorder records)
every ``stats_interval`` seconds, and tap records travel only while a tap is
attached. The parent answers the control plane's synchronous calls
(:meth:`EnginePool.snapshot`, :attr:`EnginePool.recorder`) from those pushes.

A worker that dies is restarted with backoff and counted (``worker_restarts``); its
last counters join a retired base, so totals never go backwards. Workers stop when
the parent goes: the socketpair closes, and ``PR_SET_PDEATHSIG`` sends SIGTERM.

The protocol and the bookkeeping (:func:`encode`, :func:`decode`, the codecs,
:func:`merge_stats`, :class:`PoolState`, :class:`PoolRecorder`) are pure; the
I/O is :class:`EnginePool` and :mod:`dataplane.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import io
import ipaddress
import logging
import os
import pickle
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataplane.bpf import Program
from dataplane.engine import Engine, EngineConfig
from dataplane.errors import ConfigError, DeviceError
from dataplane.fib import Fib, Path, Peer
from dataplane.recorder import DEFAULT_PER_REASON, DEFAULT_SNAPLEN, DropRecord
from dataplane.stats import EngineStats, PeerCounters
from dataplane.tap import TapFilter, TapRecord, TapSubscriber
from dataplane.tun import TunDevice

log = logging.getLogger("flannelette.workers")

Message = dict[str, Any]
MAX_MESSAGE = 64 << 20  # a tap batch of 8192 x 2 KB records fits many times over
_LEN = struct.Struct(">I")
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)
IFF_DETACH_QUEUE = 0x0400


# ---- framing ------------------------------------------------------------------------------
class ProtocolError(ValueError):
    """A message that is not one of ours (too long, not plain data, no "op")."""


class _PlainUnpickler(pickle.Unpickler):
    """Builtin containers and scalars only: any class reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"worker message refers to {module}.{name}: only plain data")


def encode(msg: Message) -> bytes:
    """One message on the wire: length, then the pickle."""
    payload = pickle.dumps(msg, protocol=5)
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    """The message in ``payload`` (without its length prefix)."""
    try:
        msg = _PlainUnpickler(io.BytesIO(payload)).load()
    except ProtocolError:
        raise
    except Exception as e:  # a truncated or foreign pickle
        raise ProtocolError(f"undecodable worker message: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError(f"worker message without an op: {type(msg).__name__}")
    return msg


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at EOF (the other side closed or died)."""
    try:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE:
            raise ProtocolError(f"message length {n} exceeds {MAX_MESSAGE}")
        return decode(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# ---- codecs (plain data both ways) -------------------------------------------------------
def config_to_wire(config: EngineConfig) -> dict[str, Any]:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["subnet"] = str(config.subnet)
    d["public_ip"] = str(config.public_ip)
    return d


def config_from_wire(d: Mapping[str, Any]) -> EngineConfig:
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    kw["subnet"] = ipaddress.IPv4Network(kw["subnet"])
    kw["public_ip"] = ipaddress.IPv4Address(kw["public_ip"])
    return EngineConfig(**kw)


def peers_to_wire(peers: Iterable[Peer]) -> list[tuple[str, str, bytes | None, str, bool]]:
    return [(str(p.subnet), str(p.public_ip), p.vtep_mac, p.path.value, p.partial_csum)
            for p in peers]


def peers_from_wire(rows: Iterable[Sequence[Any]]) -> list[Peer]:
    return [Peer(ipaddress.IPv4Network(s), ipaddress.IPv4Address(ip), mac, Path(path),
                 partial_csum=bool(partial)) for s, ip, mac, path, partial in rows]


_TAP_FIELDS = tuple(f.name for f in dataclasses.fields(TapRecord))
_DROP_FIELDS = tuple(f.name for f in dataclasses.fields(DropRecord))


def tap_to_wire(rec: TapRecord) -> tuple[Any, ...]:
    return tuple(getattr(rec, f) for f in _TAP_FIELDS)


def tap_from_wire(row: Sequence[Any], packet_id: int) -> TapRecord:
    """A worker's record with a packet id of the parent's (workers' ids collide)."""
    kw = dict(zip(_TAP_FIELDS, row, strict=True))
    kw["packet_id"] = packet_id
    return TapRecord(**kw)


def drop_to_wire(rec: DropRecord) -> tuple[Any, ...]:
    return tuple(getattr(rec, f) for f in _DROP_FIELDS)


def drop_from_wire(row: Sequence[Any]) -> DropRecord:
    return DropRecord(**dict(zip(_DROP_FIELDS, row, strict=True)))


def filter_to_wire(flt: TapFilter) -> tuple[dict[str, Any], bool]:
    """(what a worker needs to build the filter, whether the parent must still apply
    ``match_inner``): a compiled pcap filter travels as its BPF program, any other
    callable stays with the parent."""
    d: dict[str, Any] = {"side": flt.side, "direction": flt.direction,
                         "verdict": flt.verdict, "reason": flt.reason, "peer": flt.peer,
                         "bpf": None, "expr": ""}
    m = flt.match_inner
    if m is None:
        return d, False
    prog = getattr(m, "__self__", None)
    if isinstance(prog, Program) and getattr(m, "__func__", None) is Program.match:
        d["bpf"] = prog.dump()
        d["expr"] = prog.expr
        return d, False
    return d, True


def filter_from_wire(d: Mapping[str, Any]) -> TapFilter:
    prog = Program.from_ddd(d["bpf"], d.get("expr", "")) if d.get("bpf") else None
    return TapFilter(side=d["side"], direction=d["direction"], verdict=d["verdict"],
                     reason=d["reason"], peer=d["peer"],
                     match_inner=prog.match if prog is not None else None)


# ---- aggregation ---------------------------------------------------------------------------
_MAX_FIELDS = frozenset({"tun_max_batch", "udp_max_batch"})
_TEXT_FIELDS = frozenset({"tx_path", "tunnel_gso", "source_ports"})
_MAP_FIELDS = frozenset({"peers", "drops", "peer_drops"})
_INT_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats)
                    if f.name not in _MAX_FIELDS | _TEXT_FIELDS | _MAP_FIELDS)


def merge_stats(parts: Sequence[EngineStats], peer_keys: Iterable[str] | None = None
                ) -> dict[str, Any]:
    """The fields of one EngineStats for several: counters and drops summed, the batch
    maxima maxed, texts joined when they differ. ``peer_keys`` limits the peers shown
    (the current peer set; a retired worker may know removed ones)."""
    peers: dict[str, list[int]] = {}
    drops: dict[str, int] = {}
    peer_drops: dict[tuple[str, str, str], int] = {}
    ints = dict.fromkeys(_INT_FIELDS, 0)
    maxes = dict.fromkeys(_MAX_FIELDS, 0)
    texts: dict[str, list[str]] = {k: [] for k in _TEXT_FIELDS}
    for st in parts:
        for k, pc in st.peers.items():
            acc = peers.setdefault(k, [0, 0, 0, 0])
            acc[0] += pc.tx_packets
            acc[1] += pc.tx_bytes
            acc[2] += pc.rx_packets
            acc[3] += pc.rx_bytes
        for r, n in st.drops.items():
            drops[r] = drops.get(r, 0) + n
        for key, n in st.peer_drops.items():
            peer_drops[key] = peer_drops.get(key, 0) + n
        for k in _INT_FIELDS:
            ints[k] += getattr(st, k)
        for k in _MAX_FIELDS:
            maxes[k] = max(maxes[k], getattr(st, k))
        for k in _TEXT_FIELDS:
            v = getattr(st, k)
            if v and v not in texts[k]:
                texts[k].append(v)
    if peer_keys is not None:
        keep = set(peer_keys)
        peers = {k: v for k, v in peers.items() if k in keep}
    return {"peers": {k: PeerCounters(*v) for k, v in sorted(peers.items())},
            "drops": drops, "peer_drops": peer_drops, **ints, **maxes,
            **{k: " | ".join(v) for k, v in texts.items()}}


@dataclass(frozen=True)
class PoolStats(EngineStats):
    """EngineStats of a pool: the sums, plus the workers and their restarts.

    ``per_worker`` holds one plain dict per worker slot (index, pid, alive,
    restarts, its packet and byte totals), for /status and the tests.
    """

    workers: int = 0
    worker_restarts: int = 0
    per_worker: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["per_worker"] = [dict(w) for w in self.per_worker]
        return d


def worker_summary(index: int, pid: int | None, alive: bool, restarts: int,
                   st: EngineStats | None) -> dict[str, Any]:
    """One worker's line in ``per_worker``."""
    peers = st.peers.values() if st is not None else ()
    return {"index": index, "pid": pid, "alive": alive, "restarts": restarts,
            "tun_packets": st.tun_packets if st else 0,
            "udp_packets": st.udp_packets if st else 0,
            "tx_packets": sum(p.tx_packets for p in peers),
            "rx_packets": sum(p.rx_packets for p in peers),
            "tx_bytes": sum(p.tx_bytes for p in peers),
            "rx_bytes": sum(p.rx_bytes for p in peers),
            "drops": st.total_drops if st else 0}


@dataclass
class Slot:
    """One worker position: the process in it now and what it reported."""

    index: int
    pid: int | None = None
    alive: bool = False
    ready: bool = False
    restarts: int = 0
    stats: EngineStats | None = None  # the current process's last push
    tx_path: str = ""
    tunnel_reason: str = ""


class PoolState:
    """The parent's bookkeeping, without I/O: per-slot counters, the retired base,
    restarts, the peer set and the taps (records in, offered to the parent's
    subscribers)."""

    def __init__(self, workers: int, per_reason: int = DEFAULT_PER_REASON,
                 snaplen: int = DEFAULT_SNAPLEN) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.slots = [Slot(i) for i in range(workers)]
        self.retired: EngineStats | None = None
        self.restarts = 0
        self.peers: tuple[Peer, ...] = ()
        self.fib = Fib.build(())
        self.recorder = PoolRecorder(workers, per_reason, snaplen)
        self.taps: dict[int, tuple[TapSubscriber, dict[str, Any], bool]] = {}
        self._next_tap = 1
        self._next_packet = 1

    # ---- peers --------------------------------------------------------------------------
    def set_peers(self, peers: Iterable[Peer]) -> Message:
        """Validate the set (FibError as the engine raises it) and return the message that
        carries it to every worker."""
        peers = tuple(peers)
        self.fib = Fib.build(peers)
        self.peers = peers
        return {"op": "peers", "peers": peers_to_wire(peers)}

    def init_message(self, index: int, config: EngineConfig, interval: float) -> Message:
        """The first message to a (re)started worker: config, peer set, current taps."""
        return {"op": "init", "index": index, "config": config_to_wire(config),
                "peers": peers_to_wire(self.peers), "interval": interval,
                "taps": [{"id": i, "filter": w} for i, (_, w, _) in self.taps.items()]}

    # ---- worker reports -----------------------------------------------------------------
    def started(self, index: int, pid: int | None) -> None:
        s = self.slots[index]
        s.pid, s.alive, s.ready, s.stats = pid, True, False, None

    def handle(self, index: int, msg: Message) -> list[Message]:
        """Apply one worker message; returns messages for every worker (tap removals)."""
        s = self.slots[index]
        op = msg["op"]
        if op == "ready":
            s.ready = True
            s.tx_path = str(msg.get("tx_path", ""))
            s.tunnel_reason = str(msg.get("tunnel", ""))
            return []
        if op == "stats":
            s.stats = EngineStats.from_dict(msg["stats"])
            s.tx_path = s.stats.tx_path or s.tx_path
            s.tunnel_reason = s.stats.tunnel_gso or s.tunnel_reason
            for row in msg.get("drops") or ():
                self.recorder.add(index, drop_from_wire(row))
            return []
        if op == "tap":
            return self._tap_records(int(msg["id"]), msg.get("records") or (),
                                     int(msg.get("lost", 0)))
        return []

    def died(self, index: int, counted: bool = True) -> None:
        """The process in ``index`` is gone: keep its counters, count the restart."""
        s = self.slots[index]
        if s.stats is not None:
            self.retired = EngineStats(**merge_stats(
                [self.retired, s.stats] if self.retired is not None else [s.stats]))
        s.stats, s.alive, s.ready = None, False, False
        if counted:
            s.restarts += 1
            self.restarts += 1

    # ---- the aggregated view ------------------------------------------------------------
    def snapshot(self) -> PoolStats:
        parts = [s.stats for s in self.slots if s.stats is not None]
        if self.retired is not None:
            parts.append(self.retired)
        keys = [str(e.peer.subnet) for e in self.fib.entries.values()]
        merged = merge_stats(parts, keys)
        merged["tx_path"] = merged["tx_path"] or self.tx_path
        merged["tunnel_gso"] = merged["tunnel_gso"] or self.tunnel_reason
        return PoolStats(**merged, workers=len(self.slots), worker_restarts=self.restarts,
                         per_worker=tuple(worker_summary(s.index, s.pid, s.alive, s.restarts,
                                                         s.stats) for s in self.slots))

    @property
    def tx_path(self) -> str:
        return _joined(s.tx_path for s in self.slots)

    @property
    def tunnel_reason(self) -> str:
        return _joined(s.tunnel_reason for s in self.slots)

    # ---- taps ---------------------------------------------------------------------------
    def add_tap(self, sub: TapSubscriber) -> Message:
        wire, parent_filters = filter_to_wire(sub.filter)
        tap_id = self._next_tap
        self._next_tap += 1
        self.taps[tap_id] = (sub, wire, parent_filters)
        return {"op": "tap_add", "id": tap_id, "filter": wire}

    def remove_tap(self, sub: TapSubscriber) -> list[Message]:
        sub.done = True
        gone = [i for i, (s, _, _) in self.taps.items() if s is sub]
        for i in gone:
            del self.taps[i]
        return [{"op": "tap_remove", "id": i} for i in gone]

    @property
    def taps_active(self) -> int:
        return sum(1 for s, _, _ in self.taps.values() if not s.done)

    def _tap_records(self, tap_id: int, rows: Iterable[Sequence[Any]], lost: int
                     ) -> list[Message]:
        entry = self.taps.get(tap_id)
        if entry is None:
            return []  # removed while the batch was on its way
        sub, _, parent_filters = entry
        sub.lost += lost
        f = sub.filter
        for row in rows:
            if sub.done:
                break
            rec = tap_from_wire(row, self._next_packet)
            if parent_filters and f.match_inner is not None:
                inner = rec.inner if rec.inner is not None else (
                    rec.outer[22:] if rec.outer is not None else b"")
                if not f.match_inner(inner):
                    continue
            self._next_packet += 1
            size = (len(rec.inner or b"") if f.side != "outer" else 0) + (
                len(rec.outer or b"") if f.side != "inner" else 0)
            sub.offer(rec, size)
        if sub.done or sub.expired(time.monotonic()):
            del self.taps[tap_id]
            return [{"op": "tap_remove", "id": tap_id}]
        return []


def _joined(values: Iterable[str]) -> str:
    out: list[str] = []
    for v in values:
        if v and v not in out:
            out.append(v)
    return " | ".join(out)


class PoolRecorder:
    """The workers' flight recorders as one: rings per slot and reason, merged by time."""

    def __init__(self, workers: int, per_reason: int = DEFAULT_PER_REASON,
                 snaplen: int = DEFAULT_SNAPLEN) -> None:
        self.per_reason = per_reason
        self.snaplen = snaplen
        self._rings: list[dict[str, deque[DropRecord]]] = [{} for _ in range(workers)]
        self.recorded = 0

    def add(self, index: int, rec: DropRecord) -> None:
        rings = self._rings[index]
        ring = rings.get(rec.reason)
        if ring is None:
            ring = rings[rec.reason] = deque(maxlen=self.per_reason)
        ring.append(rec)
        self.recorded += 1

    def records(self, reason: str | None = None) -> list[DropRecord]:
        """Oldest first; every reason, or one (as FlightRecorder.records)."""
        out = [r for rings in self._rings
               for ring in ([rings.get(reason, deque())] if reason else rings.values())
               for r in ring]
        out.sort(key=lambda r: r.ts_ns)
        return out

    def reasons(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for rings in self._rings:
            for k, ring in rings.items():
                if ring:
                    held[k] = held.get(k, 0) + len(ring)
        return held


# ---- processes -----------------------------------------------------------------------------
class WorkerHandle(Protocol):
    """A started worker (a process, or an in-process stand-in in tests)."""

    @property
    def pid(self) -> int | None: ...

    async def wait(self) -> int | None: ...

    def kill(self) -> None: ...


Spawner = Callable[[int, socket.socket], Awaitable[WorkerHandle]]


class _Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def wait(self) -> int | None:
        return await self._proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()


async def spawn_process(index: int, sock: socket.socket) -> WorkerHandle:
    """``python -m dataplane.worker`` with ``sock`` as its channel (a fresh interpreter)."""
    fd = sock.fileno()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dataplane.worker", "--fd", str(fd), "--parent", str(os.getpid()),
        "--index", str(index), pass_fds=(fd,), stdin=asyncio.subprocess.DEVNULL)
    return _Process(proc)


def detach_queue(fd: int) -> None:
    """Take a multi-queue TUN descriptor out of the kernel's queue choice (it keeps the
    device alive and gets no packets)."""
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_DETACH_QUEUE))


@dataclass
class _Conn:
    writer: asyncio.StreamWriter | None = None
    handle: WorkerHandle | None = None
    first: asyncio.Future[str | None] | None = None  # None: ready; text: why it failed
    started_at: float = 0.0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class EnginePool:
    """N worker processes, each an Engine on the shared devices, as one engine.

    The interface is the Engine's that the control plane, the standalone runner
    and the debug API use. ``spawn`` (tests: in-process workers) and ``hold_tun``
    (False: no parent queue, for fake devices) are seams.
    """

    def __init__(self, config: EngineConfig, workers: int, *, spawn: Spawner = spawn_process,
                 hold_tun: bool = True, stats_interval: float = 0.25,
                 start_timeout: float = 30.0, restart_base: float = 0.2,
                 restart_cap: float = 5.0) -> None:
        if workers < 2:
            raise ConfigError(f"a pool needs >= 2 workers (1 runs the engine in-process), "
                              f"got {workers}")
        self.config = dataclasses.replace(config, shared_devices=True)
        self.state = PoolState(workers)
        self._spawn = spawn
        self._hold_tun = hold_tun
        self._interval = stats_interval
        self._start_timeout = start_timeout
        self._restart_base = restart_base
        self._restart_cap = restart_cap
        self._conns = [_Conn() for _ in range(workers)]
        self._tasks: list[asyncio.Task[None]] = []
        self._tun: TunDevice | None = None
        self._closing = False
        self._seq = 0

    # ---- the Engine interface -----------------------------------------------------------
    @property
    def tun_name(self) -> str:
        return self._tun.name if self._tun is not None else self.config.device_name

    @property
    def fib(self) -> Fib:
        return self.state.fib

    @property
    def recorder(self) -> PoolRecorder:
        return self.state.recorder

    @property
    def tx_path(self) -> str:
        return self.state.tx_path or "not started"

    @property
    def tunnel_reason(self) -> str:
        return self.state.tunnel_reason or "not started"

    @property
    def workers(self) -> int:
        return len(self.state.slots)

    def set_peers(self, peers: Iterable[Peer]) -> None:
        """Replace the whole peer set in every worker (FibError for a bad set)."""
        self._broadcast(self.state.set_peers(peers))

    def snapshot(self) -> PoolStats:
        """Every worker's last push, summed, plus the retired base."""
        return self.state.snapshot()

    def add_tap(self, sub: TapSubscriber) -> None:
        self._broadcast(self.state.add_tap(sub))

    def remove_tap(self, sub: TapSubscriber) -> None:
        for msg in self.state.remove_tap(sub):
            self._broadcast(msg)

    @property
    def taps_active(self) -> int:
        return self.state.taps_active

    def worker_pids(self) -> list[int | None]:
        return [s.pid if s.alive else None for s in self.state.slots]

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Hold the TUN, start every worker and wait until each has its devices open."""
        if self._hold_tun:
            cfg = self.config
            self._tun = TunDevice.open(cfg.device_name, offload=cfg.offload, multi_queue=True)
            try:
                detach_queue(self._tun.fileno())
            except OSError as e:
                self._tun.close()
                self._tun = None
                raise DeviceError(f"TUN {cfg.device_name}: cannot detach the parent's queue: "
                                  f"{e.strerror}") from None
        loop = asyncio.get_running_loop()
        for c in self._conns:
            c.first = loop.create_future()
        self._tasks = [asyncio.create_task(self._keep(i)) for i in range(self.workers)]
        try:
            async with asyncio.timeout(self._start_timeout):
                for i, c in enumerate(self._conns):
                    assert c.first is not None
                    why = await c.first
                    if why is not None:
                        raise DeviceError(f"worker {i}: {why}")
        except TimeoutError:
            await self.close()
            raise DeviceError(f"workers did not start within {self._start_timeout:g} s"
                              ) from None
        except BaseException:
            await self.close()
            raise

    async def refresh(self, timeout: float = 2.0) -> PoolStats:
        """Ask every live worker for its counters now; the snapshot once they answered."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for c in self._conns:
            if c.writer is None or c.first is None or not c.first.done():
                continue
            fut: asyncio.Future[None] = loop.create_future()
            c.waiters.append(fut)
            self._seq += 1
            self._send(c, {"op": "snapshot", "seq": self._seq})
            waits.append(fut)
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        return self.snapshot()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (their last counters kept), then release the TUN."""
        self._closing = True
        self._broadcast({"op": "stop"})
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for c, t in zip(self._conns, self._tasks, strict=True):
                if t in pending and c.handle is not None:
                    c.handle.kill()  # did not stop in time
            if pending:
                await asyncio.wait(pending, timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._tun is not None:
            self._tun.close()
            self._tun = None

    async def kill_worker(self, index: int) -> None:
        """SIGKILL one worker (tests, and a stuck one); the pool restarts it."""
        handle = self._conns[index].handle
        if handle is not None:
            handle.kill()

    # ---- per slot -----------------------------------------------------------------------
    def _send(self, c: _Conn, msg: Message) -> None:
        if c.writer is not None and not c.writer.is_closing():
            c.writer.write(encode(msg))

    def _broadcast(self, msg: Message) -> None:
        data = encode(msg)
        for c in self._conns:
            if c.writer is not None and not c.writer.is_closing():
                c.writer.write(data)

    async def _keep(self, index: int) -> None:
        """Run slot ``index`` until close: start a worker, serve it, restart it."""
        c = self._conns[index]
        failures = 0
        while not self._closing:
            why = await self._serve_one(index, c)
            if self._closing:
                break
            assert c.first is not None
            if not c.first.done():  # died before it was up once: start() reports it
                c.first.set_result(why or "exited before it was ready")
                return
            lived = time.monotonic() - c.started_at
            failures = 0 if lived > 30 else failures + 1
            delay = min(self._restart_cap, self._restart_base * 2 ** max(failures - 1, 0))
            log.warning("engine worker %d (pid %s) died after %.1f s%s; restart %d in %.1f s",
                        index, self.state.slots[index].pid, lived,
                        f" ({why})" if why else "", self.state.restarts, delay)
            await asyncio.sleep(delay)

    async def _serve_one(self, index: int, c: _Conn) -> str | None:
        """One worker process from spawn to exit; returns why it ended (if it said)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.handle = await self._spawn(index, b)
        except BaseException:
            a.close()
            raise
        finally:
            b.close()
        self.state.started(index, c.handle.pid)
        c.started_at = time.monotonic()
        reader, c.writer = await asyncio.open_connection(sock=a)
        self._send(c, self.state.init_message(index, self.config, self._interval))
        why: str | None = None
        try:
            while True:
                msg = await read_message(reader)
                if msg is None:
                    break
                op = msg["op"]
                if op == "error":
                    why = str(msg.get("error", "failed"))
                    continue
                for out in self.state.handle(index, msg):
                    self._broadcast(out)
                if op == "ready" and c.first is not None and not c.first.done():
                    c.first.set_result(None)
                if op == "stats" and msg.get("seq") is not None:
                    for fut in c.waiters:
                        if not fut.done():
                            fut.set_result(None)
                    c.waiters.clear()
        except ProtocolError as e:
            why = str(e)
            c.handle.kill()
        finally:
            w, c.writer = c.writer, None
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()
            rc = await c.handle.wait()
            if why is None and rc:
                why = f"exit status {rc}"
            counted = not self._closing and c.first is not None and c.first.done()
            self.state.died(index, counted=counted)
            for fut in c.waiters:
                if not fut.done():
                    fut.set_result(None)
            c.waiters.clear()
        return why


AnyEngine = Engine | EnginePool


async def open_pool(config: EngineConfig, workers: int) -> AnyEngine:
    """A started engine: in-process for ``workers`` == 1, else a pool of processes."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    engine: AnyEngine = Engine(config) if workers == 1 else EnginePool(config, workers)
    await engine.start()
    return engine
