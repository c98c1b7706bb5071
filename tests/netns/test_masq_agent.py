"""`flannelette run --ip-masq`: the agent installs flannel's masquerade rules itself.

h1 and h2 on segment A run agents with ``--ip-masq`` (vxlan, so container
traffic between them is tunnelled); an "outside" namespace stands for the world
beyond the Network. A container reaching the outside is seen there with its
host's address; container-to-container traffic keeps its source; subnet.env
says FLANNEL_IPMASQ=true.
"""

from __future__ import annotations

import pytest

from benchmarks.cluster import Cluster
from benchmarks.lab import Lab
from tests.netns.test_backends_e2e import VXLAN
from tests.netns.test_masq_traffic import seen_source

pytestmark = [pytest.mark.netns, pytest.mark.etcd("etcdctl")]


def test_agent_ip_masq_outside_sees_host_overlay_keeps_source(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    out_ns, out_ip = lab.add_outside("out", "10.99.0.0/24")
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=2)
        # Control: before any agent runs, the outside sees the container's own address.
        assert seen_source(lab, out_ns, out_ip, h1.container_ns) == str(h1.container_ip)
        a1 = cluster.start_agent(h1, "--ip-masq")
        a2 = cluster.start_agent(h2, "--ip-masq")
        cluster.wait_peers(a1, [str(h2.subnet)])
        cluster.wait_peers(a2, [str(h1.subnet)])
        assert "ip-masq rules installed with" in a1.log()
        with open(a1.subnet_file) as f:
            assert "FLANNEL_IPMASQ=true" in f.read()
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)

        # Leaving the Network: masqueraded to the host's address (from either host).
        assert seen_source(lab, out_ns, out_ip, h1.container_ns) == str(h1.ip)
        assert seen_source(lab, out_ns, out_ip, h2.container_ns) == str(h2.ip)
        # Container to container (through the tunnel): the source is kept, both ways.
        assert seen_source(lab, h2.container_ns, h2.container_ip, h1.container_ns) == str(
            h1.container_ip)
        assert seen_source(lab, h1.container_ns, h1.container_ip, h2.container_ns) == str(
            h2.container_ip)
        tunnelled = [p for p in cluster.status(a1)["peers"] if p["subnet"] == str(h2.subnet)]
        assert tunnelled[0]["path"] == "vxlan" and tunnelled[0]["tx_packets"] > 0
        for a in (a1, a2):
            assert cluster.stop_agent(a) == 0
            assert "Traceback" not in a.log(), a.log()


def _rules_text(lab: Lab, ns: str) -> str:
    """Our masquerade rules inside ``ns``, whichever tool the agent used."""
    nft = lab.run(ns, "nft", "list", "table", "ip", "flannelette", check=False)
    if nft.returncode == 0:
        return nft.stdout
    return lab.run(ns, "iptables", "-w", "-t", "nat", "-S", "FLANNELETTE-POSTRTG",
                   check=False).stdout


def test_masq_rules_follow_a_reacquired_different_subnet(lab: Lab) -> None:
    """Our key overwritten by another node: the agent moves to a new subnet and its
    masquerade rules name the new subnet, not the old one (containers of the new
    subnet keep their source inside the Network and are masqueraded leaving it)."""
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=3)
        a1 = cluster.start_agent(h1, "--ip-masq")
        assert "10.7.1.0/24" in _rules_text(lab, h1.ns)
        other = ('{"PublicIP":"10.10.1.77","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"02:aa:bb:cc:dd:ee"}}')
        cluster.etcdctl("put", "/coreos.com/network/subnets/10.7.1.0-24", other, api=3)
        doc = cluster.wait_status(a1, lambda d: d["node"]["subnet"] not in (None,
                                                                            "10.7.1.0/24"),
                                  30, "a new subnet")
        new = doc["node"]["subnet"]
        cluster.wait_ready(a1)
        rules = _rules_text(lab, h1.ns)
        assert new in rules and "10.7.1.0/24" not in rules, rules
        assert a1.log().count("ip-masq rules installed with") == 2
        assert cluster.stop_agent(a1) == 0
        assert "Traceback" not in a1.log(), a1.log()
