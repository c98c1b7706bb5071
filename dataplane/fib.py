"""The forwarding table: peer subnet -> peer (PublicIP, VtepMAC, path).

This is the seam between the control loop and the packet engine. The control
loop builds a whole new :class:`Fib` from a peer set and hands it over; the
engine swaps one reference, so a lookup never sees a half-updated table.

All subnets of one flannel network share one prefix length, so a lookup is one
mask and one dict access: no longest-prefix walk on the per-packet path.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Path(enum.Enum):
    """How traffic to a peer's subnet leaves this node."""

    VXLAN = "vxlan"  # encapsulated by the userspace engine
    DIRECT = "direct"  # a kernel route via the peer's PublicIP (host-gw / DirectRouting)
    UNREACHABLE = "unreachable"  # host-gw peer not on our L2 segment: no route at all


class FibError(ValueError):
    """A peer set that cannot form a table (mixed prefix lengths, duplicates)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """One remote node as the dataplane needs it."""

    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    vtep_mac: bytes | None  # 6 bytes; None for peers without VXLAN data (host-gw leases)
    path: Path = Path.VXLAN
    # The peer is a flannelette engine (its lease says so): it accepts inner TCP
    # checksums left partial (pseudo-header sum only), so the TSO split may skip the
    # full per-segment checksum. A kernel VXLAN receiver would drop such packets.
    partial_csum: bool = False

    def __post_init__(self) -> None:
        if self.vtep_mac is not None and len(self.vtep_mac) != 6:
            raise FibError(f"VtepMAC of {self.subnet} must be 6 bytes, got {len(self.vtep_mac)}")


@dataclass(frozen=True, slots=True)
class FibEntry:
    """What the engine needs per packet, precomputed once per table build."""

    peer: Peer
    public_ip_str: str  # for sendto()
    public_ip_int: int
    vtep_mac: bytes
    subnet_int: int


@dataclass(frozen=True)
class Fib:
    """An immutable table of tunnelled peers, keyed by masked destination address."""

    prefixlen: int = 32
    mask: int = 0xFFFFFFFF
    entries: Mapping[int, FibEntry] = field(default_factory=dict)
    peers: tuple[Peer, ...] = ()

    @classmethod
    def build(cls, peers: Iterable[Peer], prefixlen: int | None = None) -> Fib:
        """Build a table from a whole peer set. Only VXLAN-path peers are tunnelled."""
        all_peers = tuple(sorted(peers, key=lambda p: int(p.subnet.network_address)))
        lens = {p.subnet.prefixlen for p in all_peers}
        if prefixlen is None:
            if len(lens) > 1:
                raise FibError(f"peer subnets mix prefix lengths {sorted(lens)}")
            prefixlen = lens.pop() if lens else 32
        elif lens - {prefixlen}:
            raise FibError(f"peer subnets {sorted(lens)} do not match SubnetLen /{prefixlen}")
        mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
        entries: dict[int, FibEntry] = {}
        seen: set[int] = set()
        for p in all_peers:
            key = int(p.subnet.network_address)
            if key in seen:
                raise FibError(f"duplicate peer subnet {p.subnet}")
            seen.add(key)
            if p.path is not Path.VXLAN:
                continue
            if p.vtep_mac is None:
                raise FibError(f"peer {p.subnet} takes the VXLAN path but has no VtepMAC")
            entries[key] = FibEntry(p, str(p.public_ip), int(p.public_ip), p.vtep_mac, key)
        return cls(prefixlen, mask, entries, all_peers)

    def lookup(self, dst: int) -> FibEntry | None:
        """The tunnelled peer owning IPv4 address ``dst`` (as int), or None."""
        return self.entries.get(dst & self.mask)

    def by_public_ip(self) -> dict[int, FibEntry]:
        """Entries keyed by the peer's PublicIP, for validating received frames."""
        return {e.public_ip_int: e for e in self.entries.values()}
