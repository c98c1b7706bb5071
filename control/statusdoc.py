"""The /status and /readyz documents, built from a frozen :class:`Snapshot` (pure).

The agent copies what its parts know (lease keeper, peer watch, dataplane
supervisor, config follower) into one :class:`Snapshot` per request; this module
turns it into the JSON-ready documents, with ``now`` passed in, so every field is
testable without root, etcd or a clock. /metrics is derived from the same status
document (``control/metrics.py``), so no figure is assembled twice.
:class:`ConfigGeneration` (which version of the network config the node runs)
is also what ``flannelette explain`` shows (``control/explain.py``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from control.config import NetworkConfig
from control.lease import Lease
from control.reconcile import Decision
from dataplane.fib import Peer
from dataplane.stats import EngineStats
from dataplane.wire import mac_to_str

Document = dict[str, object]

# What the agent did with the newest value of the config key it saw (ConfigGeneration.latest).
LATEST_STATES = ("running", "same", "rejected", "deleted", "failed")
LATEST_CURRENT = ("running", "same")  # the node runs the newest value, or what it says


@dataclass(frozen=True, slots=True)
class ConfigGeneration:
    """Which version of ``<prefix>/config`` the node runs, as its config follower knows it.

    Revisions are etcd's: the v2 index or v3 revision of the change, exactly the
    key's ``modifiedIndex`` / ``mod_revision`` when the value came from a watch
    event; for a value read with a plain GET (at start-up, after a resync) the
    store's index at that read (``*_exact`` False: the key was last written at or
    before it). ``revision`` None: the follower has not read the key yet (or the
    value the node started with is not the one it read). ``latest`` says what
    the agent did with the newest value it saw (:data:`LATEST_STATES`):
    ``running`` it is the running config, ``same`` it changes nothing this node
    uses, ``rejected`` / ``deleted`` / ``failed`` the running config stayed
    (``note`` says why). ``applied`` counts the changes applied in place since
    the agent started; ``taken_at`` is the Unix time the running config was taken.
    """

    key: str
    api: str | None = None  # "v2" or "v3"
    revision: int | None = None
    revision_exact: bool = False
    applied: int = 0
    taken_at: float | None = None
    latest_revision: int | None = None
    latest_exact: bool = False
    latest: str = "running"
    note: str | None = None

    def __post_init__(self) -> None:
        if self.latest not in LATEST_STATES:
            raise ValueError(f"latest must be one of {', '.join(LATEST_STATES)}, "
                             f"got {self.latest!r}")

    @property
    def current(self) -> bool:
        """The node runs the newest value of the key it saw (or one that says the same)."""
        return self.latest in LATEST_CURRENT

    def to_json(self) -> Document:
        return {"key": self.key, "etcd_api": self.api, "revision": self.revision,
                "revision_exact": self.revision_exact, "applied_changes": self.applied,
                "taken_at": self.taken_at, "latest_revision": self.latest_revision,
                "latest_exact": self.latest_exact, "latest": self.latest,
                "current": self.current, "note": self.note}


@dataclass(frozen=True, slots=True)
class WatchState:
    """The peer watch as /status reports it; ``failing_since`` is monotonic seconds."""

    connected: bool
    synced: bool
    reconnects: int = 0
    failing_since: float | None = None  # first failure of the current streak

    def failing_for(self, now: float) -> float:
        return 0.0 if self.failing_since is None else now - self.failing_since


@dataclass(frozen=True, slots=True)
class DataplaneState:
    """What the supervisor runs: the engine's peer set (with paths), the route step's
    decisions, the engine's counters (None without an engine) and warnings."""

    up: bool = False
    peers: tuple[Peer, ...] = ()
    decisions: tuple[Decision, ...] = ()
    engine: EngineStats | None = None
    route_operations: Mapping[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    taps_active: int = 0  # captures/traces attached to the engine


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the documents say, copied at one moment."""

    config: NetworkConfig
    mtu: int
    public_ip: ipaddress.IPv4Address | None
    iface: str | None
    vtep_mac: bytes | None
    etcd_api: str | None
    endpoints: tuple[str, ...]
    lease: Lease | None = None
    lease_expires_at: float | None = None  # Unix time
    watch: WatchState | None = None  # None until the peer watch exists
    dataplane: DataplaneState = field(default_factory=DataplaneState)
    config_generation: ConfigGeneration | None = None  # None: no config follower


def _mac(mac: bytes | None) -> str | None:
    return mac_to_str(mac) if mac else None


def _peer_rows(dp: DataplaneState) -> list[Document]:
    counters = dp.engine.peers if dp.engine is not None else {}
    why = {d.peer.subnet: d for d in dp.decisions}
    rows: list[Document] = []
    for p in dp.peers:
        key = str(p.subnet)
        c = counters.get(key)
        d = why.get(p.subnet)
        rows.append({
            "subnet": key, "public_ip": str(p.public_ip), "vtep_mac": _mac(p.vtep_mac),
            "path": p.path.value,
            "tx_packets": c.tx_packets if c else 0, "rx_packets": c.rx_packets if c else 0,
            "tx_bytes": c.tx_bytes if c else 0, "rx_bytes": c.rx_bytes if c else 0,
            "reason": d.reason if d else None, "warning": d.warning if d else None,
        })
    return rows


def status(snap: Snapshot, now: float) -> Document:
    """The /status document (also the source of /metrics); ``now`` is monotonic."""
    backend = snap.config.backend
    dp = snap.dataplane
    watch = snap.watch
    connected = watch.connected if watch is not None else False
    engine: Document = {}
    if dp.engine is not None:
        engine = {k: v for k, v in dp.engine.to_dict().items() if k not in ("peers", "drops")}
        engine["taps_active"] = dp.taps_active
    return {
        "node": {
            "subnet": str(snap.lease.subnet) if snap.lease else None,
            "public_ip": str(snap.public_ip),
            "backend": str(backend.type),
            "direct_routing": backend.direct_routing,
            "vtep_mac": _mac(snap.vtep_mac),
            "mtu": snap.mtu,
            "etcd_api": snap.etcd_api,
            "iface": snap.iface,
            "network": str(snap.config.network),
        },
        "peers": _peer_rows(dp),
        "drops": dict(dp.engine.drops) if dp.engine is not None else {},
        "etcd": {
            "connected": connected,
            "lease_expires_at": snap.lease_expires_at,
            "disconnected_for": (None if connected or watch is None
                                 else watch.failing_for(now)),
            "reconnects": watch.reconnects if watch is not None else 0,
            "endpoints": list(snap.endpoints),
        },
        "config": (snap.config_generation.to_json() if snap.config_generation is not None
                   else None),
        "engine": engine,
        "reconcile": {"operations": dict(dp.route_operations)},
        "warnings": list(dp.warnings),
    }


def readiness(snap: Snapshot, now: float) -> tuple[bool, Document]:
    """/readyz: ready once we hold a lease, have seen the peers once and forward."""
    watch = snap.watch
    connected = watch.connected if watch is not None else False
    lease_held = snap.lease is not None
    synced = watch is not None and watch.synced
    doc: Document = {
        "lease_held": lease_held,
        "peers_synced": synced,
        "dataplane_up": snap.dataplane.up,
        "etcd_connected": connected,
        "etcd_unreachable_for": (0.0 if connected or watch is None
                                 else round(watch.failing_for(now), 1)),
    }
    return lease_held and synced and snap.dataplane.up, doc
