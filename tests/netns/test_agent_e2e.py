"""`flannelette run` end to end: agents as processes in lab namespaces, a real etcd."""

from __future__ import annotations

import subprocess
import time

import pytest

from benchmarks.cluster import AgentProcess, Cluster
from benchmarks.lab import Lab

pytestmark = [pytest.mark.netns("ping"), pytest.mark.etcd("etcdctl")]

# The seed's exact casing; its 172.7.0.0/16 moved to 10.7.0.0/16 (labs use 10.x only).
# tests/netns/test_registry_etcd.py parses the seed's string byte for byte.
SEED = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
PREFIX = "/coreos.com/network"


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.3)


def lease_key(subnet: str) -> str:
    net, plen = subnet.split("/")
    return f"{PREFIX}/subnets/{net}-{plen}"


def no_traceback(agent: AgentProcess) -> None:
    assert "Traceback" not in agent.log(), agent.log()


@pytest.mark.parametrize("api", [2, 3])
def test_two_agents_from_the_seed_config_containers_ping(lab: Lab, api: int) -> None:
    """The seed's exact config string (VxLAN + Directrouting), written with etcdctl v2 or
    v3. h2 sits on another segment, so DirectRouting falls back to the userspace tunnel."""
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "B", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(SEED, api=api)
        a1 = cluster.start_agent(h1)
        a2 = cluster.start_agent(h2)
        s1 = cluster.wait_peers(a1, ["10.7.2.0/24"])
        cluster.wait_peers(a2, ["10.7.1.0/24"])
        node = s1["node"]
        assert node["subnet"] == "10.7.1.0/24" and node["backend"] == "vxlan"
        assert node["etcd_api"] == f"v{api}" and node["mtu"] == 1450
        assert node["public_ip"] == str(h1.ip) and node["direct_routing"] is True
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        assert lab.ping(h2.container_ns, h1.container_ip, count=5).returncode == 0
        peer = cluster.status(a1)["peers"][0]
        assert peer["path"] == "vxlan" and peer["public_ip"] == str(h2.ip)
        assert peer["tx_packets"] >= 5 and peer["rx_packets"] >= 5
        with open(a1.subnet_file) as f:
            env = f.read()
        assert env == ("FLANNEL_NETWORK=10.7.0.0/16\nFLANNEL_SUBNET=10.7.1.1/24\n"
                       "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
        for a in (a1, a2):
            assert cluster.stop_agent(a) == 0
            no_traceback(a)


def test_lease_kept_renewed_reacquired_and_kept_over_sigterm(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=3)
        a1 = cluster.start_agent(h1, "--subnet-lease-ttl", "8",
                                 "--subnet-lease-renew-margin", "0.08")  # renew every ~3 s
        first = cluster.status(a1)["etcd"]["lease_expires_at"]
        wait_for(lambda: cluster.status(a1)["etcd"]["lease_expires_at"] > first + 1,
                 20, "a renewal")
        key = lease_key("10.7.1.0/24")
        cluster.etcdctl("del", key, api=3)
        wait_for(lambda: "disappeared from etcd" in a1.log(), 20, "loss noticed")
        wait_for(lambda: "10.7.1.0" in cluster.etcdctl("get", key, api=3).stdout, 20,
                 "lease re-acquired")
        assert cluster.status(a1)["node"]["subnet"] == "10.7.1.0/24"
        assert cluster.stop_agent(a1) == 0
        no_traceback(a1)
        assert "10.7.1.0" in cluster.etcdctl("get", key, api=3).stdout  # kept on SIGTERM
        a1b = cluster.start_agent(h1)
        assert cluster.status(a1b)["node"]["subnet"] == "10.7.1.0/24"


def test_bad_input_config_lease_and_unreachable_etcd(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    with Cluster(lab) as cluster:
        # etcd not there yet: a clear message, retries, no traceback.
        a1 = cluster.start_agent(h1, wait=False)
        wait_for(lambda: a1.log().count("cannot reach etcd") >= 1, 30, "unreachable message")
        time.sleep(2)
        assert a1.running
        no_traceback(a1)
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=2)
        cluster.wait_ready(a1, 40)
        # A malformed lease from "another node": skipped with a warning, nothing breaks.
        cluster.etcdctl("set", lease_key("10.7.9.0/24"), '{"PublicIP":"nope"}', api=2)
        a2 = cluster.start_agent(h2)
        wait_for(lambda: "skipping malformed lease" in a1.log(), 20, "malformed warning")
        cluster.wait_peers(a1, ["10.7.2.0/24"])
        assert a1.running and a2.running
        no_traceback(a1)
        # A malformed config: one clear error naming the rule, exit 1, no traceback.
        cluster.set_config('{"Network":"10.7.0.0/16","SubnetLen":31,'
                           '"Backend":{"Type":"vxlan"}}', api=2)
        h3 = lab.add_host("h3", "A")
        a3 = cluster.start_agent(h3, wait=False)
        assert a3.proc.wait(40) == 1
        assert "SubnetLen must be less than /31" in a3.log()
        no_traceback(a3)
        cluster.set_config('{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}', api=2)
        a4 = cluster.start_agent(h3, wait=False)
        assert a4.proc.wait(40) == 1 and "backend type udp" in a4.log()
        no_traceback(a4)


@pytest.mark.parametrize("api", [2, 3])
def test_etcd_outage_keeps_peers_and_pings_flowing(lab: Lab, api: int) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=api)
        a1 = cluster.start_agent(h1)
        a2 = cluster.start_agent(h2)
        cluster.wait_peers(a1, ["10.7.2.0/24"])
        cluster.wait_peers(a2, ["10.7.1.0/24"])
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        assert cluster.etcd is not None
        cluster.etcd.kill()  # etcd away for ~20 s; data kept
        ping = lab.popen(h1.container_ns, "ping", "-n", "-q", "-c", "40", "-i", "0.5",
                         "-W", "1", str(h2.container_ip), stdout=subprocess.PIPE, text=True)
        wait_for(lambda: cluster.status(a1)["etcd"]["connected"] is False, 20,
                 "agent notices etcd is away")
        during = cluster.status(a1)
        assert [p["subnet"] for p in during["peers"]] == ["10.7.2.0/24"]
        out, _ = ping.communicate(timeout=60)
        assert " 0% packet loss" in out or ", 1 received" not in out
        received = int(out.split(" received")[0].split(",")[-1])
        assert received >= 38, out  # pings kept flowing while etcd was down
        cluster.start_etcd()
        for a in (a1, a2):
            wait_for(lambda a=a: cluster.status(a)["etcd"]["connected"] is True, 40,
                     "reconnect")
        assert [p["subnet"] for p in cluster.status(a1)["peers"]] == ["10.7.2.0/24"]
        assert [p["subnet"] for p in cluster.status(a2)["peers"]] == ["10.7.1.0/24"]
        assert cluster.status(a1)["etcd"]["reconnects"] >= 1
        assert lab.ping(h1.container_ns, h2.container_ip, count=3).returncode == 0
        for a in (a1, a2):
            assert a.running
            no_traceback(a)


def test_subnet_taken_by_another_node_moves_us_to_a_new_one(lab: Lab) -> None:
    """Our key overwritten with another node's lease: the watch notices at once (no
    waiting for the 24 h renewal), we lease a new subnet, and the dataplane follows."""
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=3)
        a1 = cluster.start_agent(h1)  # default TTL: only the watch can notice in time
        assert cluster.status(a1)["node"]["subnet"] == "10.7.1.0/24"
        other = ('{"PublicIP":"10.10.1.77","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"02:aa:bb:cc:dd:ee"}}')
        cluster.etcdctl("put", lease_key("10.7.1.0/24"), other, api=3)
        doc = cluster.wait_status(a1, lambda d: d["node"]["subnet"] not in (None,
                                                                            "10.7.1.0/24"),
                                  30, "a new subnet")
        new = doc["node"]["subnet"]
        cluster.wait_ready(a1)
        # The TUN now carries the new subnet's address; the other node is our peer.
        wait_for(lambda: f"{new.split('/')[0]}/32" in lab.run(
            h1.ns, "ip", "-4", "-o", "addr", "show", "dev", "flannel.1", check=False).stdout,
            20, "the TUN with the new subnet's address")
        cluster.wait_peers(a1, ["10.7.1.0/24"])
        with open(a1.subnet_file) as f:
            assert f"FLANNEL_SUBNET={new.rsplit('.', 1)[0]}.1/24" in f.read()
        assert a1.running
        no_traceback(a1)
