"""Subnet leases: flannel's key layout and value JSON, allocation, and diffs.

Pure: records and ``now``/``rng`` in, records and decisions out. The registry
modules do the I/O; the agent decides when. Formats are flannel's
(``pkg/subnet/etcd``), so flannel and flannelette nodes in one etcd see each
other::

    <prefix>/subnets/10.5.34.0-24
    {"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",
     "BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from control.config import BackendType, NetworkConfig, fold_keys
from control.errors import AllocationError, LeaseValueError
from dataplane.wire import mac_from_str, mac_to_str

LEASE_TTL = 24 * 3600  # seconds, flannel's subnetTTL
RENEW_MARGIN = 60 * 60  # seconds, flannel's --subnet-lease-renew-margin default
CANDIDATES = 100  # flannel picks at random among the first 100 free subnets
FLANNELETTE_FIELD = "Flannelette"  # our capabilities inside a vxlan lease's BackendData
KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


def subnets_dir(prefix: str) -> str:
    """``<prefix>/subnets``, the directory (v2) or key prefix (v3) of all leases."""
    return f"{prefix.rstrip('/')}/subnets"


def subnet_key(prefix: str, subnet: ipaddress.IPv4Network) -> str:
    """The etcd key of ``subnet``'s lease: ``<prefix>/subnets/10.5.34.0-24``."""
    return f"{subnets_dir(prefix)}/{subnet.network_address}-{subnet.prefixlen}"


def parse_key(key: str) -> ipaddress.IPv4Network | None:
    """The IPv4 subnet named by a lease key, or None if it is not a lease key."""
    m = KEY_RE.search(key)
    if m is None:
        return None
    try:
        return ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a lease value says about its node."""

    public_ip: ipaddress.IPv4Address
    backend_type: str  # lower case; BackendType for ours, any string for a peer's
    vni: int | None = None
    vtep_mac: bytes | None = None
    # A flannelette node: its engine accepts inner TCP checksums left partial. Published
    # as BackendData.Flannelette.CsumPartial, a field flannel's decoder ignores.
    csum_partial: bool = False


@dataclass(frozen=True, slots=True)
class RawLease:
    """A lease as the registry read it: subnet, value text, expiry (unix s; None = none)."""

    subnet: ipaddress.IPv4Network
    value: str
    expiration: float | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """A decoded lease."""

    subnet: ipaddress.IPv4Network
    attrs: LeaseAttrs
    expiration: float | None = None


def encode_attrs(attrs: LeaseAttrs) -> str:
    """The lease value exactly as flannel writes it (field order, null PublicIPv6).

    A ``csum_partial`` vxlan lease adds ``"Flannelette":{"CsumPartial":true}`` after
    VtepMAC inside BackendData; everything before it stays byte-identical to
    flannel's, and flannel's vxlan backend (Go's JSON decoder) ignores the field.
    """
    doc: dict[str, Any] = {"PublicIP": str(attrs.public_ip), "PublicIPv6": None,
                           "BackendType": attrs.backend_type}
    if attrs.backend_type == BackendType.VXLAN:
        data: dict[str, Any] = {"VNI": attrs.vni if attrs.vni is not None else 1,
                                "VtepMAC": mac_to_str(attrs.vtep_mac or bytes(6))}
        if attrs.csum_partial:
            data[FLANNELETTE_FIELD] = {"CsumPartial": True}
        doc["BackendData"] = data
    return json.dumps(doc, separators=(",", ":"))


def _csum_partial(bdata: Mapping[str, Any]) -> bool:
    """True only for ``"Flannelette":{"CsumPartial":true}``; anything else is a peer
    that may be a kernel (flannel never writes the field), never an error."""
    ext = bdata.get(FLANNELETTE_FIELD.lower())
    return isinstance(ext, dict) and fold_keys(ext).get("csumpartial") is True


def decode_attrs(value: str | bytes) -> LeaseAttrs:
    """Parse a lease value the way flannel does (case-insensitive names); raise LeaseValueError."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LeaseValueError(f"lease value is not JSON: {exc}") from None
    except RecursionError:  # json.loads recurses per nesting level: "[[[[..." (fuzzing)
        raise LeaseValueError("lease value is not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise LeaseValueError(f"lease value is not a JSON object: {value!r}")
    fields = fold_keys(doc)
    try:
        public_ip = ipaddress.IPv4Address(fields.get("publicip"))
    except (ipaddress.AddressValueError, ValueError):
        raise LeaseValueError(f"lease PublicIP is not an IPv4 address: "
                              f"{fields.get('publicip')!r}") from None
    btype = fields.get("backendtype", "")
    if not isinstance(btype, str):
        raise LeaseValueError(f"lease BackendType is not a string: {btype!r}")
    btype = btype.lower()
    vni: int | None = None
    mac: bytes | None = None
    partial = False
    if btype == BackendType.VXLAN:
        data = fields.get("backenddata")
        if not isinstance(data, dict):
            raise LeaseValueError(f"vxlan lease has no BackendData object: {data!r}")
        bdata = fold_keys(data)
        raw_vni = bdata.get("vni", 1)
        if isinstance(raw_vni, bool) or not isinstance(raw_vni, int):
            raise LeaseValueError(f"lease VNI is not an integer: {raw_vni!r}")
        vni = raw_vni
        raw_mac = bdata.get("vtepmac")
        if not isinstance(raw_mac, str):
            raise LeaseValueError(f"vxlan lease has no VtepMAC: {raw_mac!r}")
        try:
            mac = mac_from_str(raw_mac)
        except ValueError as exc:  # dataplane.errors.ConfigError is a ValueError
            raise LeaseValueError(f"lease VtepMAC: {exc}") from None
        partial = _csum_partial(bdata)
    return LeaseAttrs(public_ip, btype, vni, mac, partial)


def decode_lease(raw: RawLease) -> Lease:
    """Decode a registry record; raise LeaseValueError naming the subnet."""
    try:
        return Lease(raw.subnet, decode_attrs(raw.value), raw.expiration)
    except LeaseValueError as exc:
        raise LeaseValueError(f"lease {raw.subnet}: {exc}") from None


# ---- allocation -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AcquirePlan:
    """What to write to hold a lease.

    ``reuse``: the key already holds a lease with our PublicIP; overwrite it
    (flannel's step 1, publishes our new VtepMAC). Otherwise create the key
    atomically; losing that race means: re-list and plan again. ``stale``: our
    old leases that no longer fit the config, to delete first.
    """

    subnet: ipaddress.IPv4Network
    reuse: bool
    stale: tuple[ipaddress.IPv4Network, ...] = ()


def _overlaps_any(subnet: ipaddress.IPv4Network, taken_same: set[int],
                  taken_other: Sequence[ipaddress.IPv4Network]) -> bool:
    if int(subnet.network_address) in taken_same:
        return True
    return any(subnet.overlaps(t) for t in taken_other)


def plan_acquire(config: NetworkConfig, leases: Iterable[Lease],
                 public_ip: ipaddress.IPv4Address,
                 preferred: Sequence[ipaddress.IPv4Network] = (),
                 rng: random.Random | None = None,
                 exclude: Iterable[ipaddress.IPv4Network] = ()) -> AcquirePlan:
    """Choose our subnet in flannel's order; raise AllocationError when none is free.

    1. a lease whose PublicIP is ours and which fits the config (others of ours: stale);
    2. a preferred subnet (subnet.env, the one we held before) if free and fitting;
    3. at random among the first 100 free subnets from SubnetMin to SubnetMax.
    ``exclude`` holds subnets we just lost a race for (not yet visible in ``leases``).
    """
    all_leases = list(leases)
    ours = [le for le in all_leases if le.attrs.public_ip == public_ip]
    fitting = [le.subnet for le in ours if config.contains_subnet(le.subnet)]
    stale = tuple(le.subnet for le in ours if not config.contains_subnet(le.subnet))
    if fitting:
        return AcquirePlan(fitting[0], True, stale)

    taken = [le.subnet for le in all_leases if le.attrs.public_ip != public_ip]
    taken += list(exclude)
    same = {int(t.network_address) for t in taken if t.prefixlen == config.subnet_len}
    other = [t for t in taken if t.prefixlen != config.subnet_len]
    for want in preferred:
        if config.contains_subnet(want) and not _overlaps_any(want, same, other):
            return AcquirePlan(want, False, stale)

    size = 1 << (32 - config.subnet_len)
    free: list[ipaddress.IPv4Network] = []
    addr, last = int(config.subnet_min), int(config.subnet_max)
    while addr <= last and len(free) < CANDIDATES:
        cand = ipaddress.IPv4Network((addr, config.subnet_len))
        if not _overlaps_any(cand, same, other):
            free.append(cand)
        addr += size
    if not free:
        raise AllocationError(
            f"no free subnet left in {config.subnet_min}..{config.subnet_max} "
            f"(/{config.subnet_len}) of {config.network}")
    return AcquirePlan((rng or random.Random()).choice(free), False, stale)


def renew_at(expiration: float, margin: float, now: float) -> float:
    """When to renew a lease expiring at ``expiration``: ``margin`` before, never in the past."""
    return max(now, expiration - margin)


# ---- peer tables ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LeaseDiff:
    """What changed between two lease tables (renewals with equal values are no change)."""

    added: tuple[Lease, ...] = ()
    changed: tuple[Lease, ...] = ()
    removed: tuple[ipaddress.IPv4Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff_leases(old: Mapping[ipaddress.IPv4Network, Lease],
                new: Mapping[ipaddress.IPv4Network, Lease]) -> LeaseDiff:
    """The adds, value changes and removals that turn ``old`` into ``new``."""
    added = tuple(le for s, le in new.items() if s not in old)
    changed = tuple(le for s, le in new.items() if s in old and old[s].attrs != le.attrs)
    removed = tuple(s for s in old if s not in new)
    return LeaseDiff(added, changed, removed)


def previous_vtep_mac(leases: Iterable[RawLease], public_ip: ipaddress.IPv4Address,
                      preferred: Iterable[ipaddress.IPv4Network] = ()) -> bytes | None:
    """Our VtepMAC from the lease we still hold (same PublicIP, vxlan), if any.

    A restarted agent reuses it, as flannel does (its kernel ``flannel.1`` keeps its
    MAC across a restart): peers then need no new value from etcd before traffic
    flows again. A lease for a ``preferred`` subnet (subnet.env's) wins.
    """
    wanted = set(preferred)
    found: bytes | None = None
    for raw in leases:
        try:
            lease = decode_lease(raw)
        except LeaseValueError:
            continue
        a = lease.attrs
        if a.public_ip != public_ip or a.vtep_mac is None:
            continue
        if lease.subnet in wanted:
            return a.vtep_mac
        found = found or a.vtep_mac
    return found
