"""The config generation: which version of <prefix>/config the dataplane runs.

The config follower records it as it reads and applies the key (start-up read,
watch events, rejected/deleted/failed values, a resync), /status and /debug/node
carry it, and explain names it in its first step, so a decision can be traced
to the config that produced it. No root, no etcd: a scripted config watch and
the supervisor on fake parts.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

from control import debugcli
from control.config import NetworkConfig, parse_config
from control.debugapi import agent_streams, supervisor_node
from control.debugcli import get_json
from control.errors import ResyncRequired
from control.explain import NodeView, Probe, config_text, explain, generation_text
from control.follower import ConfigFollower
from control.health import HealthServer
from control.lease import Lease, LeaseAttrs
from control.reconcile import RouteLookup
from control.registry import ConfigEvent
from control.statusdoc import ConfigGeneration, Snapshot, status
from control.supervisor import Supervisor
from dataplane.fib import Path as FibPath
from dataplane.fib import Peer
from tests.control_fakes import Recorder
from tests.fakes import run_async

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
OWN = N("10.7.1.0/24")
KEY = "/coreos.com/network/config"
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
VXLAN_DR = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}'
HOST_GW = '{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'
VNI2 = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true,"VNI":2}}'
PEER = Peer(N("10.7.2.0/24"), A("10.10.1.2"), bytes.fromhex("0a0000000002"), FibPath.VXLAN)


class ScriptedWatch:
    """A registry with a config watch that hands out what the test queues."""

    api = "v3"

    def __init__(self, value: str | None, revision: int) -> None:
        self.read: tuple[str | None, int] = (value, revision)
        self.events: asyncio.Queue[ConfigEvent | Exception] = asyncio.Queue()
        self.reads = 0

    async def get_config_rev(self) -> tuple[str | None, int]:
        self.reads += 1
        return self.read

    async def watch_config(self, cursor: int, timeout: float) -> ConfigEvent:
        item = await self.events.get()
        if isinstance(item, Exception):
            raise item
        return item


class FakeKeeper:
    subnet = OWN

    def __init__(self, attrs: LeaseAttrs) -> None:
        self.attrs = attrs

    async def republish(self, attrs: LeaseAttrs, config: NetworkConfig | None = None) -> None:
        self.attrs = attrs


class FakeWatcher:
    def set_backend_type(self, backend_type: object) -> None:
        pass


async def node(rec: Recorder, tmp_path: Path, reg: ScriptedWatch, clock: Callable[[], float]
               ) -> tuple[ConfigFollower, Supervisor]:
    dp = Supervisor(parse_config(VXLAN), 1450, A("10.10.1.1"),
                    subnet_file=str(tmp_path / "subnet.env"), engine_starter=rec.start_engine,
                    routes_factory=rec.new_routes, masq_installer=rec.install_masq)
    lease = Lease(OWN, dp.lease_attrs())
    dp.lease_acquired(lease)
    await dp.start(lease)
    follower = ConfigFollower(reg, dp, FakeKeeper(dp.lease_attrs()),  # type: ignore[arg-type]
                              FakeWatcher(), key=KEY, iface_mtu=1500,  # type: ignore[arg-type]
                              clock=clock)
    return follower, dp


async def settled(follower: ConfigFollower, before: ConfigGeneration) -> ConfigGeneration:
    """The follower's generation once it moved on from ``before``."""
    for _ in range(1000):
        if follower.generation != before:
            return follower.generation
        await asyncio.sleep(0.001)
    raise AssertionError(f"the generation stayed {before}")


@run_async
async def test_the_follower_records_each_value_and_what_became_of_it(tmp_path: Path) -> None:
    rec = Recorder()
    reg = ScriptedWatch(VXLAN, 12)
    t = [100.0]
    follower, dp = await node(rec, tmp_path, reg, lambda: t[0])
    g0 = follower.generation
    assert (g0.key, g0.api, g0.revision, g0.taken_at, g0.applied) == (KEY, "v3", None, 100.0, 0)
    task = asyncio.ensure_future(follower.run(VXLAN))
    try:
        g = await settled(follower, g0)  # the first read: the value we started with
        assert (g.revision, g.revision_exact, g.latest_revision, g.latest, g.applied) == (
            12, False, 12, "running", 0) and g.current and g.taken_at == 100.0

        async def event(value: str | None, revision: int, now: float) -> ConfigGeneration:
            t[0] = now
            before = follower.generation
            await reg.events.put(ConfigEvent(True, value, revision))
            return await settled(follower, before)

        g = await event(VXLAN_DR, 15, 200.0)  # applied in place
        assert dp.config == parse_config(VXLAN_DR)
        assert (g.revision, g.revision_exact, g.applied, g.taken_at, g.latest) == (
            15, True, 1, 200.0, "running") and g.note is None
        g = await event(VXLAN_DR, 16, 300.0)  # the same text written again
        assert (g.revision, g.latest_revision, g.latest, g.current, g.applied) == (
            15, 16, "same", True, 1) and g.taken_at == 200.0
        g = await event("not json", 17, 400.0)
        assert (g.revision, g.latest_revision, g.latest, g.current) == (15, 17, "rejected", False)
        assert g.note is not None and g.note.startswith(f"new network config at {KEY} rejected")
        g = await event(None, 18, 500.0)
        assert (g.revision, g.latest_revision, g.latest, g.current) == (15, 18, "deleted", False)
        rec.fail_engine_start = True
        g = await event(VNI2, 19, 600.0)  # a restart with VNI 2 whose engine fails
        assert dp.config == parse_config(VXLAN_DR)
        assert (g.revision, g.latest_revision, g.latest, g.applied) == (15, 19, "failed", 1)
        assert g.note == ("the VXLAN engine did not start: TUN busy; kept backend "
                          "vxlan + DirectRouting")
        # The watch cursor was compacted: the key is read again, and differs.
        reg.read = (HOST_GW, 30)
        t[0] = 700.0
        before = follower.generation
        await reg.events.put(ResyncRequired("compacted"))
        g = await settled(follower, before)
        assert dp.config == parse_config(HOST_GW) and reg.reads == 2
        assert (g.revision, g.revision_exact, g.latest_revision, g.latest_exact, g.latest,
                g.applied, g.taken_at) == (30, False, 30, False, "running", 2, 700.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@run_async
async def test_a_different_value_at_the_first_read_is_applied(tmp_path: Path) -> None:
    """Changed between start-up and the follower's first read: no revision for the
    start-up value, the read one applied."""
    rec = Recorder()
    reg = ScriptedWatch(VXLAN_DR, 40)
    follower, dp = await node(rec, tmp_path, reg, lambda: 5.0)
    task = asyncio.ensure_future(follower.run(VXLAN))
    try:
        g = await settled(follower, follower.generation)
        assert dp.config == parse_config(VXLAN_DR)
        assert (g.revision, g.revision_exact, g.applied, g.latest) == (40, False, 1, "running")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


GEN = ConfigGeneration(key=KEY, api="v3", revision=15, revision_exact=True, applied=1,
                       taken_at=1000.0, latest_revision=15)


def test_generation_lines_for_each_state() -> None:
    def line(**kw: object) -> str:
        return generation_text(ConfigGeneration(**{"key": KEY, **kw}).to_json(),  # type: ignore[arg-type]
                               now=1300.0)
    assert generation_text(GEN.to_json(), now=1300.0) == (
        f"{KEY} at etcd v3 revision 15, taken 5 min ago, 1 change applied since start; the "
        "newest value seen in etcd")
    assert line(api="v2", revision=12, latest_revision=12) == (
        f"{KEY} as read at etcd v2 index 12, no change applied since start; the newest value "
        "seen in etcd")
    assert line(api="v3") == (f"{KEY} (revision not read yet), no change applied since start; "
                              "etcd not read since start")
    assert line(api="v3", revision=15, revision_exact=True, latest_revision=16, latest="same",
                applied=3, taken_at=1290.0) == (
        f"{KEY} at etcd v3 revision 15, taken 10 s ago, 3 changes applied since start; the "
        "newest value (etcd v3 revision 16) changes nothing this node uses")
    assert line(api="v3", revision=15, revision_exact=True, latest_revision=17,
                latest="rejected", note="bad JSON") == (
        f"{KEY} at etcd v3 revision 15, no change applied since start; NOT the newest: the "
        "newest value (etcd v3 revision 17) was rejected, this one kept: bad JSON")
    assert line(api="v3", revision=15, revision_exact=True, latest_revision=18,
                latest="deleted").endswith(
        "NOT the newest: the key was deleted (etcd v3 revision 18), this one kept")
    assert line(api="v3", latest_revision=40, latest="failed", note="TUN busy") == (
        f"{KEY} as read at start-up, before etcd v3 revision 40, no change applied since "
        "start; NOT the newest: the newest value (etcd v3 revision 40) was not applied: "
        "TUN busy")


def test_status_carries_the_generation() -> None:
    config = parse_config(VXLAN)
    bare = Snapshot(config=config, mtu=1450, public_ip=A("10.10.1.1"), iface="eth0",
                    vtep_mac=None, etcd_api="v3", endpoints=())
    assert status(bare, now=0.0)["config"] is None
    doc = status(Snapshot(config=config, mtu=1450, public_ip=A("10.10.1.1"), iface="eth0",
                          vtep_mac=None, etcd_api="v3", endpoints=(), config_generation=GEN),
                 now=0.0)
    assert doc["config"] == {
        "key": KEY, "etcd_api": "v3", "revision": 15, "revision_exact": True,
        "applied_changes": 1, "taken_at": 1000.0, "latest_revision": 15,
        "latest_exact": False, "latest": "running", "current": True, "note": None}


VIEW = NodeView(subnet=OWN, public_ip=A("10.10.1.1"), vtep_mac=bytes.fromhex("0a0000000001"),
                network=N("10.7.0.0/16"), direct_routing=True, peers=(PEER,), tun="flannel.1",
                generation=GEN)
TUN = {A("10.7.2.5"): (RouteLookup(None, "flannel.1"),),
       A("10.10.1.2"): (RouteLookup(None, "eth0"),), A("10.7.1.5"): (RouteLookup(None, "cni0"),)}
CONFIG_DETAIL = (f"backend vxlan + DirectRouting, VNI 1, port 8472, MTU 1450, Network "
                 f"10.7.0.0/16; from {KEY} at etcd v3 revision 15, taken 5 min ago, 1 change "
                 "applied since start; the newest value seen in etcd")


def test_explain_names_the_config_first_in_both_directions() -> None:
    tx = explain(VIEW, Probe(A("10.7.1.5"), A("10.7.2.5")), TUN, 1300.0)
    assert tx.verdict == "vxlan" and tx.steps[0] == {
        "step": "config", "detail": CONFIG_DETAIL, "revision": 15, "current": True}
    assert [s["step"] for s in tx.steps[1:3]] == ["packet", "kernel route"]
    doc = tx.to_json(VIEW, 1300.0)
    assert doc["config"] == GEN.to_json()
    text = debugcli.render_explanation(doc).splitlines()
    assert text[0] == f"  1. config         {CONFIG_DETAIL}"
    assert text[-1] == ("verdict: vxlan  peer 10.7.2.0/24 (PublicIP 10.10.1.2, VtepMAC "
                        "0a:00:00:00:00:02)")
    rx = explain(VIEW, Probe(A("10.7.2.5"), A("10.7.1.5"), outer_src=A("10.10.1.2")), TUN,
                 1300.0)
    assert rx.verdict == "vxlan" and rx.steps[0]["step"] == "config"
    assert rx.steps[1]["step"] == "datagram"
    stale = NodeView(**{**VIEW.__dict__, "generation": ConfigGeneration(
        key=KEY, api="v3", revision=15, revision_exact=True, latest_revision=17,
        latest="rejected", note="no")})
    first = explain(stale, Probe(A("10.7.1.5"), A("10.7.2.5")), TUN, 1300.0).steps[0]
    assert first["current"] is False and "NOT the newest" in first["detail"]


def test_a_standalone_engine_has_no_config_step() -> None:
    engine = NodeView(subnet=OWN, public_ip=A("10.10.1.1"), peers=(PEER,), tun="flannel.1")
    ex = explain(engine, Probe(A("10.7.1.5"), A("10.7.2.5")), TUN, 0.0)
    assert ex.steps[0]["step"] == "packet" and ex.to_json(engine, 0.0)["config"] is None
    assert engine.to_json(0.0)["config"] is None
    assert config_text(engine.to_json(0.0), 0.0) == (
        "backend vxlan, VNI 1, port 8472, MTU 1450; config generation not known")


@run_async
async def test_an_agent_serves_the_followers_generation(tmp_path: Path) -> None:
    """agent_streams with the follower's generation: /debug/node and /debug/explain."""
    rec = Recorder()
    reg = ScriptedWatch(VXLAN, 12)
    follower, dp = await node(rec, tmp_path, reg, lambda: 100.0)
    assert supervisor_node(dp, None).generation is None
    assert supervisor_node(dp, None, follower.generation).generation == follower.generation
    g0 = follower.generation
    task = asyncio.ensure_future(follower.run(VXLAN))
    server = HealthServer("127.0.0.1", 0, {},
                          agent_streams(dp, lambda: None, lambda: follower.generation))
    await server.start()
    try:
        await settled(follower, g0)
        before = follower.generation
        await reg.events.put(ConfigEvent(True, VXLAN_DR, 15))
        await settled(follower, before)
        doc = await asyncio.to_thread(get_json, "127.0.0.1", server.port, "/debug/node", {})
        assert doc["direct_routing"] is True
        assert (doc["config"]["revision"], doc["config"]["applied_changes"],
                doc["config"]["current"]) == (15, 1, True)
        ex = await asyncio.to_thread(get_json, "127.0.0.1", server.port, "/debug/explain",
                                     {"src": "10.7.1.5", "dst": "10.7.2.5"})
        assert ex["config"] == doc["config"]
        assert ex["steps"][0]["step"] == "config" and ex["steps"][0]["revision"] == 15
        assert ex["steps"][0]["detail"].startswith(
            f"backend vxlan + DirectRouting, VNI 1, port 8472, MTU 1450, Network 10.7.0.0/16; "
            f"from {KEY} at etcd v3 revision 15, taken ")
    finally:
        await server.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

