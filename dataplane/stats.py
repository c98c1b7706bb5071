"""Engine counters: mutable, named ones for the packet path; frozen records for readers.

The packet loops count into :class:`Counters` and :class:`PeerStats` (classes
with ``__slots__``: an attribute add is as cheap as a list index, and the name
says what moves). :meth:`dataplane.engine.Engine.snapshot` freezes them into
:class:`EngineStats` for the control plane, the status CLI and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class Counters:
    """Engine-wide counters, moved only by the two loops after the I/O succeeded."""

    __slots__ = ("arp_replies", "busy_poll_hits", "busy_polls", "icmp_unreachable",
                 "rx_csum_partial", "rx_gro_merged",
                 "rx_gso", "tap_records", "tap_records_lost", "tso_segments", "tso_splits",
                 "tun_max_batch", "tun_packets", "tun_wakeups", "tunnel_gso_segments",
                 "tunnel_gso_writes", "tx_csum_completed",
                 "tx_csum_partial", "tx_gso_sends", "udp_max_batch", "udp_packets",
                 "udp_wakeups")

    def __init__(self) -> None:
        self.arp_replies = 0
        self.busy_poll_hits = 0
        self.busy_polls = 0
        self.icmp_unreachable = 0
        self.rx_csum_partial = 0
        self.rx_gro_merged = 0
        self.rx_gso = 0
        self.tap_records = 0
        self.tap_records_lost = 0
        self.tso_segments = 0
        self.tso_splits = 0
        self.tun_max_batch = 0
        self.tun_packets = 0
        self.tun_wakeups = 0
        self.tunnel_gso_segments = 0
        self.tunnel_gso_writes = 0
        self.tx_csum_completed = 0
        self.tx_csum_partial = 0
        self.tx_gso_sends = 0
        self.udp_max_batch = 0
        self.udp_packets = 0
        self.udp_wakeups = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class PeerStats:
    """Traffic with one peer, in inner-packet units; kept across peer-set swaps."""

    __slots__ = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")

    def __init__(self) -> None:
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0

    def freeze(self) -> PeerCounters:
        return PeerCounters(self.tx_packets, self.tx_bytes, self.rx_packets, self.rx_bytes)


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
    :class:`dataplane.wire.DropReason` value; ``peer_drops`` by
    ``(reason, peer subnet or "-", "rx"|"tx")``. The batch figures say how many
    packets each reader wake-up drained (the engine's main efficiency lever).
    """

    peers: Mapping[str, PeerCounters] = field(default_factory=dict)
    drops: Mapping[str, int] = field(default_factory=dict)
    peer_drops: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    tun_packets: int = 0  # packets read from the TUN (a TSO super-packet counts once)
    udp_packets: int = 0  # receive calls that returned data (a GRO batch counts once)
    tun_wakeups: int = 0
    udp_wakeups: int = 0
    tun_max_batch: int = 0
    udp_max_batch: int = 0
    arp_replies: int = 0
    icmp_unreachable: int = 0
    rx_csum_partial: int = 0  # written to the TUN with NEEDS_CSUM
    rx_gso: int = 0  # written to the TUN as one GSO super-packet
    rx_gro_merged: int = 0  # received segments that joined a GSO super-packet
    tx_csum_partial: int = 0  # segments sent to flannelette peers with a partial checksum
    tx_csum_completed: int = 0  # partial checksums from the TUN completed for kernel peers
    tx_gso_sends: int = 0  # UDP GSO system calls (each carried several datagrams)
    tso_splits: int = 0  # TUN super-packets split into MSS segments
    tso_segments: int = 0
    tap_records: int = 0  # records handed to captures and traces
    tap_records_lost: int = 0  # records a full tap queue could not take (traffic unaffected)
    tunnel_gso_writes: int = 0  # super-packets handed to the kernel to segment (one write each)
    tunnel_gso_segments: int = 0  # the datagrams those writes became
    busy_polls: int = 0  # polls made while busy polling (--busy-poll-us)
    busy_poll_hits: int = 0  # of those, the ones that found a packet (a wake-up saved)
    tx_path: str = ""  # tunnel-gso | tso-split+udp-gso | udp-gso | per-datagram
    tunnel_gso: str = ""  # on (device) | off | unavailable: why
    source_ports: str = ""  # the outer source ports flows leave from ("8472": no lanes)
    @property
    def total_drops(self) -> int:
        return sum(self.drops.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the standalone runner's --stats-file)."""
        d = asdict(self)
        d["peers"] = {k: asdict(v) for k, v in self.peers.items()}
        d["drops"] = dict(self.drops)
        d["peer_drops"] = [[r, p, s, n] for (r, p, s), n in sorted(self.peer_drops.items())]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineStats:
        known = {f.name for f in fields(cls)} - {"peers", "drops", "peer_drops"}
        peers = {k: PeerCounters(**v) for k, v in d.get("peers", {}).items()}
        peer_drops = {(str(r), str(p), str(s)): int(n) for r, p, s, n in d.get("peer_drops", [])}
        rest = {k: v for k, v in d.items() if k in known}
        return cls(peers=peers, drops=dict(d.get("drops", {})), peer_drops=peer_drops, **rest)
