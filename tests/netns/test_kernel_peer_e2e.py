"""A kernel-VXLAN node (flannel's own dataplane) in a cluster of `flannelette run` agents.

h1 and h2 (segment A) run agents; k (segment B, behind the router) runs no agent
but a ``flannel.1`` device set up as flannel sets it up (benchmarks.kernel_vxlan).
The test plays flanneld for k: it writes k's lease to etcd exactly as flannel
>= 0.18 does (an etcd lease, then the key ``<prefix>/subnets/10.7.9.0-24`` with
``{"PublicIP":..,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":..}}``),
and installs the neighbour/FDB/route entries for the flannelette nodes it reads
from their leases. Then containers ping and move data over TCP both ways.
"""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.cluster import Cluster
from benchmarks.kernel_vxlan import KernelVxlan
from benchmarks.lab import Host, Lab
from tests.netns.test_backends_e2e import PREFIX, VXLAN_DR
from tests.netns.test_engine_netns import tcp_transfer

pytestmark = [pytest.mark.netns, pytest.mark.etcd("etcdctl")]


NBYTES = 512 << 10


def flannel_lease(cluster: Cluster, kv: KernelVxlan) -> None:
    """Publish the kernel node's lease the way flannel's v3 registry does."""
    granted = cluster.etcdctl("lease", "grant", "86400", api=3).stdout
    m = re.search(r"lease ([0-9a-f]+) granted", granted)
    assert m, granted
    key = f"{PREFIX}/subnets/{kv.subnet.network_address}-{kv.subnet.prefixlen}"
    value = json.dumps({"PublicIP": str(kv.public_ip), "PublicIPv6": None,
                        "BackendType": "vxlan",
                        "BackendData": {"VNI": kv.vni, "VtepMAC": kv.mac}},
                       separators=(",", ":"))
    cluster.etcdctl("put", f"--lease={m.group(1)}", key, value, api=3)


def leases(cluster: Cluster) -> dict[str, dict[str, object]]:
    """Every lease in etcd: subnet text -> decoded value (what flanneld would watch)."""
    out = cluster.etcdctl("get", "--prefix", f"{PREFIX}/subnets/", api=3).stdout.splitlines()
    found: dict[str, dict[str, object]] = {}
    for key, value in zip(out[::2], out[1::2], strict=True):
        net, plen = key.rsplit("/", 1)[1].split("-")
        found[f"{net}/{plen}"] = json.loads(value)
    return found


def follow_leases(cluster: Cluster, kv: KernelVxlan) -> list[str]:
    """flanneld's job on k: a neighbour, FDB entry and route per vxlan lease of another node."""
    added = []
    for subnet, value in leases(cluster).items():
        if subnet == str(kv.subnet) or value["BackendType"] != "vxlan":
            continue
        data = value["BackendData"]
        assert isinstance(data, dict)
        kv.add_peer(subnet, str(value["PublicIP"]), str(data["VtepMAC"]))
        added.append(subnet)
    return sorted(added)


def test_kernel_vxlan_node_and_flannelette_nodes_reach_each_other(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    k = lab.add_host("k", "B", "10.7.9.0/24")
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        # The seed's VxLAN + Directrouting: h1 <-> h2 go direct, k (routed) is tunnelled.
        cluster.set_config(VXLAN_DR, api=3)
        kv = KernelVxlan.create(k.ns, str(k.subnet), str(k.ip))
        assert kv.mtu == 1450
        flannel_lease(cluster, kv)
        a1 = cluster.start_agent(h1)
        a2 = cluster.start_agent(h2)
        for agent, other in ((a1, h2), (a2, h1)):
            doc = cluster.wait_peers(agent, [str(other.subnet), str(k.subnet)])
            paths = {p["subnet"]: p for p in doc["peers"]}
            assert paths[str(k.subnet)]["path"] == "vxlan"
            assert paths[str(k.subnet)]["vtep_mac"] == kv.mac
            assert paths[str(k.subnet)]["public_ip"] == str(k.ip)
        assert follow_leases(cluster, kv) == [str(h1.subnet), str(h2.subnet)]
        fdb = lab.run(k.ns, "bridge", "fdb", "show", "dev", kv.name).stdout
        for h, agent in ((h1, a1), (h2, a2)):
            mac = cluster.status(agent)["node"]["vtep_mac"]
            assert f"{mac} dst {h.ip}" in fdb, fdb

        for h in (h1, h2):
            check_both_ways(lab, h, k)
        for agent in (a1, a2):
            row = [p for p in cluster.status(agent)["peers"] if p["subnet"] == str(k.subnet)]
            assert row[0]["tx_bytes"] > NBYTES and row[0]["rx_bytes"] > NBYTES
            assert "Traceback" not in agent.log(), agent.log()


def check_both_ways(lab: Lab, h: Host, k: Host) -> None:
    assert h.container_ns and k.container_ns and h.container_ip and k.container_ip
    assert lab.wait_ping(h.container_ns, k.container_ip, deadline=20), h.name
    assert lab.ping(k.container_ns, h.container_ip, count=3).returncode == 0, h.name
    sent, got = tcp_transfer(lab, k.container_ns, h.container_ns, str(h.container_ip),
                             nbytes=NBYTES, seed=3)
    assert sent == got and sent.startswith(str(NBYTES)), f"kernel -> {h.name}"
    sent, got = tcp_transfer(lab, h.container_ns, k.container_ns, str(k.container_ip),
                             nbytes=NBYTES, seed=4)
    assert sent == got and sent.startswith(str(NBYTES)), f"{h.name} -> kernel"
