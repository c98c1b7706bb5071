"""Engine counters as frozen records, for the control plane, the status CLI and tests.

The engine counts into plain mutable lists on the packet path and freezes them
into these records only when someone asks (:meth:`Engine.snapshot`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PeerCounters:
    """Traffic with one peer, in inner-packet units (what the containers sent)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A point-in-time copy of every engine counter.

    ``peers`` is keyed by the peer subnet (``"10.244.2.0/24"``), ``drops`` by
    :class:`dataplane.wire.DropReason` value. The batch figures say how many
    packets each reader wake-up drained (the engine's main efficiency lever).
    """

    peers: Mapping[str, PeerCounters] = field(default_factory=dict)
    drops: Mapping[str, int] = field(default_factory=dict)
    tun_packets: int = 0  # packets read from the TUN
    udp_packets: int = 0  # datagrams received on the UDP socket
    tun_wakeups: int = 0
    udp_wakeups: int = 0
    tun_max_batch: int = 0
    udp_max_batch: int = 0
    arp_replies: int = 0
    icmp_unreachable: int = 0
    rx_csum_partial: int = 0  # written to the TUN with NEEDS_CSUM
    rx_gso: int = 0  # written to the TUN as one GSO super-packet
    tx_csum_partial: int = 0  # TCP segments sent to flannelette peers with a partial checksum

    @property
    def total_drops(self) -> int:
        return sum(self.drops.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the standalone runner's --stats-file)."""
        d = asdict(self)
        d["peers"] = {k: asdict(v) for k, v in self.peers.items()}
        d["drops"] = dict(self.drops)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineStats:
        peers = {k: PeerCounters(**v) for k, v in d.get("peers", {}).items()}
        rest = {k: v for k, v in d.items() if k not in ("peers", "drops")}
        return cls(peers=peers, drops=dict(d.get("drops", {})), **rest)
