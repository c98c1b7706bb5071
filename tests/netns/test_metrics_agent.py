"""The agent's /metrics in the lab: prometheus-client's own parser reads it, and the
counters move by at least the packets a ping sends through the tunnel."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.cluster import AgentProcess, Cluster
from benchmarks.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.etcd("etcdctl")]

CONFIG = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN"}}'
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(cluster: Cluster, agent: AgentProcess) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, sorted labels), and the type of each family."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(cluster.metrics(agent)):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def test_metrics_parse_and_counters_move_with_pings(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "B", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(CONFIG, api=2)
        a1 = cluster.start_agent(h1)
        a2 = cluster.start_agent(h2)
        cluster.wait_peers(a1, ["10.7.2.0/24"])
        cluster.wait_peers(a2, ["10.7.1.0/24"])
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)

        before, types = scrape(cluster, a1)
        peer = (("path", "vxlan"), ("peer_subnet", "10.7.2.0/24"))
        tx = ("flannelette_peer_transmit_packets_total", peer)
        rx = ("flannelette_peer_receive_packets_total", peer)
        assert types["flannelette_peer_transmit_packets"] == "counter"
        assert types["flannelette_dropped_packets"] == "counter"
        assert types["flannelette_engine_packets"] == "counter"
        assert before[("flannelette_etcd_up", ())] == 1
        assert before[("flannelette_etcd_reconnects_total", ())] == 0
        assert before[("flannelette_peers", (("path", "vxlan"),))] == 1
        expiry = before[("flannelette_lease_expiry_timestamp_seconds", ())]
        assert time.time() + 86400 - 120 < expiry < time.time() + 86400 + 10
        assert before[("flannelette_engine_max_batch_packets", (("source", "tun"),))] >= 1
        # vxlan: the agent replaced (at least) the Network route into the TUN once.
        assert before[("flannelette_reconcile_operations_total", (("op", "replace"),))] >= 1
        assert before[("flannelette_reconcile_operations_total", (("op", "failed"),))] == 0

        assert lab.ping(h1.container_ns, h2.container_ip, count=20, interval=0.05
                        ).returncode == 0
        after, _ = scrape(cluster, a1)
        assert after[tx] >= before[tx] + 20
        assert after[rx] >= before[rx] + 20
        key = ("flannelette_peer_transmit_bytes_total", peer)
        assert after[key] >= before[key] + 20 * 84  # 20 echo requests of 84 IP bytes
        tun = ("flannelette_engine_packets_total", (("source", "tun"),))
        udp = ("flannelette_engine_packets_total", (("source", "udp"),))
        assert after[tun] >= before[tun] + 20 and after[udp] >= before[udp] + 20
        # h2 saw the same packets from the other side.
        other, _ = scrape(cluster, a2)
        back = (("path", "vxlan"), ("peer_subnet", "10.7.1.0/24"))
        assert other[("flannelette_peer_receive_packets_total", back)] >= after[tx] - 1
