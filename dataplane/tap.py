"""Taps: per-packet records with their verdicts, for `flannelette capture` and `trace`.

Off by default: the engine holds ``None`` and its loops test one local per
packet. A capture or trace adds a :class:`TapSubscriber` (side, filters,
bounds); while any is attached, the loops hand each packet's decision to
:meth:`TapHub.emit`, which copies the bytes only for subscribers whose cheap
filters (direction, verdict, reason, peer) and pcap filter match. Every
subscriber has a bounded queue: when its reader falls behind, records are
lost and counted, traffic never waits.

Records carry what Wireshark needs: the inner IPv4 packet (what the TUN gave
or took) and/or the outer VXLAN datagram (UDP payload) with its addresses and
ports, one ``packet_id`` shared by both sides of one packet, and the verdict
and rule as text for the pcapng comment.

Pure: the engine passes the clock; nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SIDES = ("inner", "outer", "both")
VERDICTS = ("forwarded", "dropped")
QUEUE_RECORDS = 8192


@dataclass(frozen=True, slots=True)
class TapRecord:
    """One packet's passage through the engine."""

    ts_ns: int
    packet_id: int
    direction: str  # "tx": TUN -> UDP (encapsulated); "rx": UDP -> TUN (decapsulated)
    verdict: str  # "forwarded" | "dropped"
    reason: str  # the drop reason, "" when forwarded
    rule: str  # what the engine did beyond plain forwarding ("" if nothing)
    peer: str  # peer subnet ("" if none)
    peer_ip: str
    peer_mac: str
    inner: bytes | None  # IPv4 packet
    outer: bytes | None  # VXLAN datagram = UDP payload (VXLAN + Ethernet + inner)
    outer_src: str
    outer_dst: str
    outer_sport: int
    outer_dport: int

    def comment(self) -> str:
        """The pcapng packet comment: verdict, peer, rule and the link id."""
        if self.verdict == "dropped":
            text = f"dropped: {self.reason}"
        else:
            text = f"forwarded {'to' if self.direction == 'tx' else 'from'} peer {self.peer}"
            text += f" (PublicIP {self.peer_ip}, VtepMAC {self.peer_mac})"
        if self.rule:
            text += f"; {self.rule}"
        return f"{text}; {self.direction}; packet {self.packet_id}"


@dataclass
class TapFilter:
    """What a subscriber wants; ``match_inner`` is a compiled pcap filter (or None)."""

    side: str = "both"
    direction: str | None = None  # "tx" | "rx" | None (both)
    verdict: str | None = None
    reason: str | None = None
    peer: str | None = None  # peer subnet, e.g. "10.244.2.0/24"
    match_inner: Callable[[bytes], bool] | None = None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {self.side!r}")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be forwarded or dropped, got {self.verdict!r}")
        if self.direction not in (None, "tx", "rx"):
            raise ValueError(f"direction must be tx or rx, got {self.direction!r}")


@dataclass
class TapSubscriber:
    """One capture or trace: a filter, bounds, and a queue its reader drains."""

    filter: TapFilter = field(default_factory=TapFilter)
    count: int = 0  # stop after this many records (0: no bound)
    max_bytes: int = 0  # stop after this many captured bytes (0: no bound)
    deadline: float = 0.0  # time.monotonic() to stop at (0: no bound)
    queue: deque[TapRecord] = field(default_factory=lambda: deque(maxlen=QUEUE_RECORDS))
    taken: int = 0
    taken_bytes: int = 0
    lost: int = 0
    done: bool = False

    def offer(self, rec: TapRecord, size: int) -> bool:
        """Queue ``rec`` unless a bound is reached or the queue is full (then count it lost)."""
        if self.done:
            return False
        if len(self.queue) >= QUEUE_RECORDS:
            self.lost += 1
            return False
        self.queue.append(rec)
        self.taken += 1
        self.taken_bytes += size
        if (self.count and self.taken >= self.count) or (
                self.max_bytes and self.taken_bytes >= self.max_bytes):
            self.done = True
        return True

    def expired(self, now: float) -> bool:
        return self.done or bool(self.deadline and now >= self.deadline)

    def drain(self) -> list[TapRecord]:
        out = list(self.queue)
        self.queue.clear()
        return out


class TapHub:
    """The subscribers of one engine; the loops call :meth:`emit` while any is attached."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock  # nanoseconds since the epoch (the engine passes time.time_ns)
        self.subscribers: list[TapSubscriber] = []
        self.next_id = 1
        self.records = 0
        self.lost = 0

    def packet_id(self) -> int:
        """A fresh id shared by the inner and outer record of one packet."""
        n = self.next_id
        self.next_id = n + 1
        return n

    def emit(self, direction: str, verdict: str, reason: str, rule: str, peer: str,
             peer_ip: str, peer_mac: str, inner: bytes | bytearray | memoryview | None,
             outer: bytes | bytearray | memoryview | None, outer_src: str, outer_dst: str,
             outer_sport: int, outer_dport: int) -> None:
        rec: TapRecord | None = None
        inner_b: bytes | None = None
        for sub in self.subscribers:
            f = sub.filter
            if sub.done or (f.direction and f.direction != direction) or (
                    f.verdict and f.verdict != verdict) or (f.reason and f.reason != reason) or (
                    f.peer and f.peer != peer):
                continue
            if f.match_inner is not None:
                if inner_b is None:
                    inner_b = bytes(inner) if inner is not None else (
                        bytes(outer[22:]) if outer is not None else b"")
                if not f.match_inner(inner_b):
                    continue
            if rec is None:
                rec = TapRecord(self.clock(), self.packet_id(), direction, verdict, reason,
                                rule, peer, peer_ip, peer_mac,
                                bytes(inner) if inner is not None else None,
                                bytes(outer) if outer is not None else None,
                                outer_src, outer_dst, outer_sport, outer_dport)
            size = (len(rec.inner or b"") if f.side != "outer" else 0) + (
                len(rec.outer or b"") if f.side != "inner" else 0)
            if sub.offer(rec, size):
                self.records += 1
            else:
                self.lost += 1

    def prune(self) -> None:
        """Forget finished subscribers (their readers hold their own reference)."""
        self.subscribers = [s for s in self.subscribers if not s.done]
