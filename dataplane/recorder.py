"""The flight recorder: the last dropped packets per reason, always on, bounded.

Every drop the engine counts also lands here: per reason, a ring of the last
``per_reason`` packets (bytes cut at ``snaplen``) with time, direction, peer
and outer source. It is there when the incident happened, before anyone
thought of a capture. Memory is bounded by ``per_reason * snaplen`` bytes per
reason (32 x 2048 B = 64 KiB per reason; ~1.3 MiB for all 21 reasons).

Pure: the caller passes the time; nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_PER_REASON = 32
DEFAULT_SNAPLEN = 2048


@dataclass(frozen=True, slots=True)
class DropRecord:
    """One dropped packet as the engine saw it.

    ``data`` is the inner IPv4 packet for the TUN side (tx), the VXLAN datagram
    (UDP payload: VXLAN + Ethernet + inner) for the UDP side (rx), cut at the
    snap length; ``length`` is its full size. ``peer`` is the peer subnet, or
    ``""`` when no peer is known (unknown source, no route).
    """

    ts_ns: int
    reason: str
    direction: str  # "tx" (from the TUN) or "rx" (from UDP)
    peer: str
    outer_src: str  # rx: the datagram's source address; tx: ""
    length: int
    data: bytes
    count: int = 1  # > 1 when one failed call lost several packets (e.g. a GSO send)


class FlightRecorder:
    """Rings of :class:`DropRecord`, one per drop reason."""

    def __init__(self, per_reason: int = DEFAULT_PER_REASON,
                 snaplen: int = DEFAULT_SNAPLEN) -> None:
        if per_reason < 1 or snaplen < 64:
            raise ValueError(f"flight recorder needs per_reason >= 1 and snaplen >= 64, got "
                             f"{per_reason}, {snaplen}")
        self.per_reason = per_reason
        self.snaplen = snaplen
        self._rings: dict[str, deque[DropRecord]] = {}
        self.recorded = 0

    def record(self, ts_ns: int, reason: str, direction: str, peer: str, outer_src: str,
               data: bytes | bytearray | memoryview | None, count: int = 1) -> None:
        ring = self._rings.get(reason)
        if ring is None:
            ring = self._rings[reason] = deque(maxlen=self.per_reason)
        raw = b"" if data is None else bytes(data[:self.snaplen])
        length = 0 if data is None else len(data)
        ring.append(DropRecord(ts_ns, reason, direction, peer, outer_src, length, raw, count))
        self.recorded += 1

    def records(self, reason: str | None = None) -> list[DropRecord]:
        """Oldest first; every reason, or one."""
        rings = [self._rings.get(reason, deque())] if reason else list(self._rings.values())
        out = [r for ring in rings for r in ring]
        out.sort(key=lambda r: r.ts_ns)
        return out

    def reasons(self) -> dict[str, int]:
        """Records held per reason."""
        return {k: len(v) for k, v in self._rings.items() if v}
