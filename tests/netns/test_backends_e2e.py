"""The seed's three flannel models, end to end, with `flannelette run` on three hosts.

h1 and h2 share segment A, h3 sits on segment B behind the lab's router; a
container behind each host; one real etcd in the lab's core. For each model the
seed's own procedure runs: stop the agents, ``etcdctl rm`` the config, ``etcdctl
set`` the new one (v2, the seed's exact strings with a 10.x Network), start the
agents again. One lab serves the whole module.

The helpers (``ThreeHosts``, ``three_host_world``, ``restart_with``, ``tx_to``,
``our_routes``) are reused by the other issue-4 tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from benchmarks.cluster import AgentProcess, Cluster
from benchmarks.lab import Host, Lab

pytestmark = [pytest.mark.netns("ping", "iperf3"), pytest.mark.etcd("etcdctl")]


PREFIX = "/coreos.com/network"
CONFIG_KEY = f"{PREFIX}/config"
NETWORK = "10.7.0.0/16"
# The seed's strings (its "172.7.0.0/16" moved to 10.7/16: labs use 10.x only).
HOST_GW = '{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN"}}'
TUN_ROUTE = f"{NETWORK} dev flannel.1 scope link"  # the Network into the engine's TUN
VXLAN_DR = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'


@dataclass
class ThreeHosts:
    """The shared lab: three hosts with containers, etcd, and the agents of the last start."""

    lab: Lab
    cluster: Cluster
    h1: Host
    h2: Host
    h3: Host
    agents: dict[str, AgentProcess]

    @property
    def hosts(self) -> tuple[Host, Host, Host]:
        return self.h1, self.h2, self.h3

    def agent(self, host: Host) -> AgentProcess:
        return self.agents[host.name]


@contextlib.contextmanager
def three_hosts_lab() -> Iterator[ThreeHosts]:
    """h1, h2 on segment A, h3 on B (behind the router), containers, etcd started."""
    with Lab() as lab:
        lab.add_segment("A", "10.10.1.0/24")
        lab.add_segment("B", "10.10.2.0/24")
        h1 = lab.add_host("h1", "A", "10.7.1.0/24")
        h2 = lab.add_host("h2", "A", "10.7.2.0/24")
        h3 = lab.add_host("h3", "B", "10.7.3.0/24")
        with Cluster(lab) as cluster:
            cluster.start_etcd()
            yield ThreeHosts(lab, cluster, h1, h2, h3, {})


@pytest.fixture(scope="module")
def three_host_world() -> Iterator[ThreeHosts]:
    with three_hosts_lab() as world:
        yield world


def subnet(host: Host) -> str:
    return str(host.subnet)


def stop_all(world: ThreeHosts) -> None:
    for agent in world.agents.values():
        if agent.running:
            assert world.cluster.stop_agent(agent) == 0, agent.log()
            assert "Traceback" not in agent.log(), agent.log()
    world.agents.clear()


def start_all(world: ThreeHosts, *flags: str) -> None:
    """Start the three agents side by side, then wait for each to be ready and see the rest."""
    for h in world.hosts:
        world.agents[h.name] = world.cluster.start_agent(h, *flags, wait=False)
    for h in world.hosts:
        world.cluster.wait_ready(world.agent(h), 60)
    for h in world.hosts:
        others = [subnet(o) for o in world.hosts if o is not h]
        world.cluster.wait_peers(world.agent(h), others, 40)


def restart_with(world: ThreeHosts, config: str, *flags: str) -> None:
    """The seed's procedure: stop the agents, rm the config, set the new one, start again."""
    stop_all(world)
    world.cluster.etcdctl("rm", CONFIG_KEY, api=2, check=False)  # absent the first time
    world.cluster.etcdctl("set", CONFIG_KEY, config, api=2)
    start_all(world, *flags)


def peer_row(doc: dict[str, Any], host: Host) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [p for p in doc["peers"] if p["subnet"] == subnet(host)]
    assert len(rows) == 1, doc["peers"]
    return rows[0]


def paths(world: ThreeHosts, src: Host) -> dict[str, str]:
    """Peer subnet -> path, from ``src``'s /status."""
    doc = world.cluster.status(world.agent(src))
    return {p["subnet"]: p["path"] for p in doc["peers"]}


def wait_paths(world: ThreeHosts, src: Host, want: dict[str, str], timeout: float = 30.0
               ) -> dict[str, Any]:
    """Poll ``src``'s /status until its peers' paths are ``want`` (host name -> path)."""
    expect = {subnet(world.lab.hosts[name]): path for name, path in want.items()}

    def ok(doc: dict[str, Any]) -> bool:
        return {p["subnet"]: p["path"] for p in doc["peers"]} == expect
    return world.cluster.wait_status(world.agent(src), ok, timeout, f"paths {expect}")


def tx_to(world: ThreeHosts, src: Host, dst: Host) -> int:
    """Packets ``src``'s engine tunnelled to ``dst`` (its /status counter)."""
    return int(peer_row(world.cluster.status(world.agent(src)), dst)["tx_packets"])


def our_routes(lab: Lab, host: Host) -> list[str]:
    """The routes flannelette installed on ``host`` (protocol 157), normalised."""
    out = lab.ip(host.ns, "-4", "route", "show", "proto", "157").stdout
    return sorted(" ".join(w for w in line.split() if w not in ("linkdown",))
                  for line in out.splitlines() if line.strip())


def wait_routes(lab: Lab, host: Host, want: list[str], timeout: float = 10.0) -> None:
    """Poll until ``host``'s routes of ours are exactly ``want`` (status may lead the
    kernel by a moment); AssertionError with the last table otherwise."""
    deadline = time.monotonic() + timeout
    while (got := our_routes(lab, host)) != sorted(want):
        if time.monotonic() > deadline:
            raise AssertionError(f"{host.name} routes {got} != {sorted(want)}")
        time.sleep(0.2)


def ping_ok(lab: Lab, src: Host, dst: Host, count: int = 3) -> bool:
    assert src.container_ns is not None and dst.container_ip is not None
    return lab.ping(src.container_ns, dst.container_ip, count=count).returncode == 0


def assert_pairs_ping(world: ThreeHosts, pairs: list[tuple[Host, Host]]) -> None:
    """Each pair answers (the first ping of a pair may wait for the last peer to settle)."""
    lab = world.lab
    for a, b in pairs:
        assert a.container_ns is not None and b.container_ip is not None
        assert lab.wait_ping(a.container_ns, b.container_ip, deadline=20), (
            f"{a.name} -> {b.name}:\n{world.agent(a).log()[-3000:]}")


def all_pairs(world: ThreeHosts) -> list[tuple[Host, Host]]:
    return [(a, b) for a in world.hosts for b in world.hosts if a is not b]


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
             ) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.3)


# ---- the three models ---------------------------------------------------------------------------
def test_host_gw_same_segment_pings_and_the_routed_host_is_reported(
        three_host_world: ThreeHosts) -> None:
    w = three_host_world
    h1, h2, h3 = w.hosts
    restart_with(w, HOST_GW)
    doc = wait_paths(w, h1, {"h2": "direct", "h3": "unreachable"})
    assert doc["node"]["backend"] == "host-gw"
    assert_pairs_ping(w, [(h1, h2), (h2, h1)])
    wait_routes(w.lab, h1, [f"{subnet(h2)} via {h2.ip} dev eth0"])
    # h3 is behind the router: no route, a warning naming it in /status and in the log.
    row = peer_row(doc, h3)
    assert row["warning"] and subnet(h3) in row["warning"] and str(h3.ip) in row["warning"]
    assert "not on our L2 segment" in row["warning"]
    assert any(subnet(h3) in x and "not on our L2 segment" in x for x in doc["warnings"])
    assert "not on our L2 segment" in w.agent(h1).log() and subnet(h3) in w.agent(h1).log()
    assert not ping_ok(w.lab, h1, h3, count=1)
    # h3 sees both of the others as unreachable, with the same kind of warning.
    doc3 = wait_paths(w, h3, {"h1": "unreachable", "h2": "unreachable"})
    assert len([x for x in doc3["warnings"] if "not on our L2 segment" in x]) == 2
    wait_routes(w.lab, h3, [])


def test_vxlan_all_pairs_ping_and_h1_to_h2_is_tunnelled(three_host_world: ThreeHosts) -> None:
    w = three_host_world
    h1, h2, _h3 = w.hosts
    restart_with(w, VXLAN)
    doc = wait_paths(w, h1, {"h2": "vxlan", "h3": "vxlan"})
    assert doc["node"]["backend"] == "vxlan" and doc["node"]["direct_routing"] is False
    assert_pairs_ping(w, all_pairs(w))
    before = tx_to(w, h1, h2)
    assert ping_ok(w.lab, h1, h2, count=5)
    assert tx_to(w, h1, h2) - before >= 5
    wait_routes(w.lab, h1, [TUN_ROUTE])


def test_vxlan_directrouting_direct_on_segment_tunnel_across_router(
        three_host_world: ThreeHosts) -> None:
    w = three_host_world
    h1, h2, h3 = w.hosts
    restart_with(w, VXLAN_DR)
    doc = wait_paths(w, h1, {"h2": "direct", "h3": "vxlan"})
    assert doc["node"]["backend"] == "vxlan" and doc["node"]["direct_routing"] is True
    wait_paths(w, h2, {"h1": "direct", "h3": "vxlan"})
    wait_paths(w, h3, {"h1": "vxlan", "h2": "vxlan"})
    assert_pairs_ping(w, all_pairs(w))
    # h1 -> h2: a kernel route via h2's PublicIP, nothing through the tunnel.
    got = w.lab.ip(h1.ns, "route", "show", subnet(h2)).stdout
    assert f"via {h2.ip} dev eth0" in got and "proto 157" in got
    before2, before3 = tx_to(w, h1, h2), tx_to(w, h1, h3)
    assert ping_ok(w.lab, h1, h2, count=5)
    assert ping_ok(w.lab, h1, h3, count=5)
    assert tx_to(w, h1, h2) == before2
    assert tx_to(w, h1, h3) - before3 >= 5
    wait_routes(w.lab, h1, [TUN_ROUTE, f"{subnet(h2)} via {h2.ip} dev eth0"])
