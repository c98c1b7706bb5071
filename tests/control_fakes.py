"""Fakes for the dataplane supervisor's parts: engine, route programmer, masquerade rules.

They record what the supervisor asked of them in one shared ``events`` list, so a
test can assert the order of a live switch or a subnet move without root.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from control.reconcile import Decision
from control.routes import Handoff
from dataplane.engine import EngineConfig
from dataplane.fib import Path, Peer
from dataplane.stats import EngineStats

Subnet = ipaddress.IPv4Network


@dataclass
class Recorder:
    """Shared event log plus switches that make the next start or sync fail."""

    events: list[tuple[str, object]] = field(default_factory=list)
    engines: list[FakeEngine] = field(default_factory=list)
    routes: list[FakeRoutes] = field(default_factory=list)
    fail_engine_start: bool = False

    async def start_engine(self, config: EngineConfig) -> FakeEngine:
        if self.fail_engine_start:
            self.fail_engine_start = False
            raise OSError("TUN busy")
        engine = FakeEngine(self, config)
        self.engines.append(engine)
        self.events.append(("engine start", config.subnet))
        return engine

    def new_routes(self, device: str | None, network: Subnet, own_subnet: Subnet) -> FakeRoutes:
        routes = FakeRoutes(self, device, network, own_subnet)
        self.routes.append(routes)
        self.events.append(("routes", own_subnet))
        return routes

    async def install_masq(self, network: Subnet, own_subnet: Subnet) -> str:
        self.events.append(("masq", own_subnet))
        return "fake-nft"


class FakeEngine:
    def __init__(self, rec: Recorder, config: EngineConfig) -> None:
        self.rec = rec
        self.config = config
        self.peers: tuple[Peer, ...] = ()
        self.closed = False

    @property
    def tun_name(self) -> str:
        return f"flannel.{self.config.vni}"

    def set_peers(self, peers: Iterable[Peer]) -> None:
        self.peers = tuple(peers)
        self.rec.events.append(("engine peers", tuple(str(p.subnet) for p in self.peers)))

    def snapshot(self) -> EngineStats:
        return EngineStats()

    async def close(self) -> None:
        self.closed = True
        self.rec.events.append(("engine close", self.config.subnet))


class FakeRoutes:
    """Decides VXLAN for every peer under vxlan, DIRECT under host-gw; no kernel."""

    def __init__(self, rec: Recorder, device: str | None, network: Subnet,
                 own_subnet: Subnet) -> None:
        self.rec = rec
        self.device = device
        self.network = network
        self.own_subnet = own_subnet
        self.warnings: tuple[str, ...] = ()
        self.decisions: tuple[Decision, ...] = ()
        self.operations: dict[str, int] = {"replace": 0, "delete": 0, "failed": 0}
        self.on_peers: Handoff | None = None

    async def adopt(self) -> tuple[()]:
        return ()

    async def sync(self, backend: str, direct_routing: bool, peers: tuple[Peer, ...], *,
                   handoff: Handoff | None = None) -> tuple[Peer, ...]:
        path = Path.VXLAN if backend == "vxlan" else Path.DIRECT
        out = tuple(Peer(p.subnet, p.public_ip, p.vtep_mac, path, p.partial_csum)
                    for p in peers)
        self.decisions = tuple(Decision(p, f"fake {path.value}") for p in out)
        self.rec.events.append(("sync", (str(backend), self.device, self.own_subnet)))
        return out

    async def watch(self, on_peers: Handoff) -> None:
        self.on_peers = on_peers
        await asyncio.Event().wait()
