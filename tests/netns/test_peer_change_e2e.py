"""A peer changes its VtepMAC, then its PublicIP: traffic follows, nothing stale remains.

h1, h2 on segment A, h3 on B behind the router, all running `flannelette run`
with the seed's VxLAN + Directrouting (v2 API): h1 <-> h2 direct, h3 tunnelled.

1. h2's agent restarts: a new random VtepMAC, published by rewriting its lease.
   h1 and h3 show the new MAC; h3's tunnel to h2 carries traffic with it.
2. h2 moves to another address: its agent stops, the address changes, its lease
   is rewritten with the new PublicIP (as an operator or a reconfigured flanneld
   would), the agent starts again. h1 replaces its direct route, h3 tunnels to
   the new address; no route or /status entry names the old address anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from benchmarks.lab import Host
from tests.netns.test_backends_e2e import (
    PREFIX,
    TUN_ROUTE,
    VXLAN_DR,
    ThreeHosts,
    peer_row,
    restart_with,
    subnet,
    three_hosts_lab,
    tx_to,
    wait_paths,
    wait_routes,
)

pytestmark = [pytest.mark.netns, pytest.mark.etcd("etcdctl")]


NEW_IP = "10.10.1.20"


@pytest.fixture(scope="module")
def world() -> Iterator[ThreeHosts]:
    with three_hosts_lab() as w:
        yield w


def lease_key(host: Host) -> str:
    assert host.subnet is not None
    return f"{PREFIX}/subnets/{host.subnet.network_address}-{host.subnet.prefixlen}"


def restart_agent(w: ThreeHosts, host: Host) -> None:
    agent = w.agent(host)
    assert w.cluster.stop_agent(agent) == 0 and "Traceback" not in agent.log()
    w.agents[host.name] = w.cluster.start_agent(host, timeout=60)


def mentions(text: str, ip: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(ip)}(?![\d])", text) is not None


def pings(w: ThreeHosts, pairs: list[tuple[Host, Host]]) -> None:
    for a, b in pairs:
        assert a.container_ns and b.container_ip
        assert w.lab.wait_ping(a.container_ns, b.container_ip, deadline=20), (
            f"{a.name} -> {b.name}\n{w.agent(a).log()[-2000:]}")


def test_vtep_mac_then_public_ip_change(world: ThreeHosts) -> None:
    w = world
    h1, h2, h3 = w.hosts
    old_ip = str(h2.ip)
    restart_with(w, VXLAN_DR)
    wait_paths(w, h1, {"h2": "direct", "h3": "vxlan"})
    wait_paths(w, h3, {"h1": "vxlan", "h2": "vxlan"})
    pings(w, [(h3, h2), (h1, h2)])

    # 1. A plain restart keeps the VtepMAC (the lease names it, as flannel's kept
    # flannel.1 does); a new one comes when the lease went away while the agent was
    # down: it leases the same subnet again with a fresh VtepMAC.
    old_mac = w.cluster.status(w.agent(h2))["node"]["vtep_mac"]
    restart_agent(w, h2)
    assert w.cluster.status(w.agent(h2))["node"]["vtep_mac"] == old_mac
    agent = w.agent(h2)
    assert w.cluster.stop_agent(agent) == 0 and "Traceback" not in agent.log()
    w.cluster.etcdctl("rm", lease_key(h2), api=2)
    w.agents[h2.name] = w.cluster.start_agent(h2, timeout=60)
    new_mac = w.cluster.status(w.agent(h2))["node"]["vtep_mac"]
    assert new_mac != old_mac
    assert new_mac in w.cluster.etcdctl("get", lease_key(h2), api=2).stdout
    for src in (h1, h3):
        w.cluster.wait_status(w.agent(src), lambda d: peer_row(d, h2)["vtep_mac"] == new_mac,
                              30, f"{src.name} learns h2's new VtepMAC")
    before = tx_to(w, h3, h2)
    pings(w, [(h3, h2), (h2, h3), (h1, h2)])
    assert tx_to(w, h3, h2) > before
    for src in (h1, h3):
        assert old_mac not in json.dumps(w.cluster.status(w.agent(src)))

    # 2. A new PublicIP: stop, re-address, rewrite the lease, start again.
    agent2 = w.agent(h2)
    assert w.cluster.stop_agent(agent2) == 0
    w.lab.ip(h2.ns, "addr", "del", f"{old_ip}/24", "dev", "eth0")
    w.lab.ip(h2.ns, "addr", "add", f"{NEW_IP}/24", "dev", "eth0")
    w.lab.ip(h2.ns, "route", "replace", "default", "via", str(h2.segment.gateway))
    value = json.loads(w.cluster.etcdctl("get", lease_key(h2), api=2).stdout)
    value["PublicIP"] = NEW_IP
    w.cluster.etcdctl("set", "--ttl", "86400", lease_key(h2),
                      json.dumps(value, separators=(",", ":")), api=2)
    w.agents["h2"] = w.cluster.start_agent(h2, timeout=60)
    doc2 = w.cluster.status(w.agent(h2))
    assert doc2["node"]["public_ip"] == NEW_IP and doc2["node"]["subnet"] == subnet(h2)
    for src, path in ((h1, "direct"), (h3, "vxlan")):
        doc = w.cluster.wait_status(
            w.agent(src), lambda d: peer_row(d, h2)["public_ip"] == NEW_IP, 30,
            f"{src.name} follows h2 to {NEW_IP}")
        assert peer_row(doc, h2)["path"] == path
    wait_routes(w.lab, h1, [TUN_ROUTE, f"{subnet(h2)} via {NEW_IP} dev eth0"])
    wait_routes(w.lab, h3, [TUN_ROUTE])
    wait_routes(w.lab, h2, [TUN_ROUTE, f"{subnet(h1)} via {h1.ip} dev eth0"])
    before = tx_to(w, h3, h2)
    pings(w, [(h1, h2), (h2, h1), (h3, h2), (h2, h3)])
    assert tx_to(w, h3, h2) > before
    # Nothing anywhere still points at the old address.
    for h in w.hosts:
        routes = w.lab.ip(h.ns, "-4", "route", "show", "proto", "157").stdout
        assert not mentions(routes, old_ip), (h.name, routes)
        doc = w.cluster.status(w.agent(h))
        assert not mentions(json.dumps(doc["peers"]), old_ip), (h.name, doc["peers"])
        assert len(doc["peers"]) == 2
        assert "Traceback" not in w.agent(h).log()

