"""Fault: our lease deleted by hand, then overwritten with another node's value.

Three vxlan hosts on one segment. With traffic from h2's container to h1's:

1. ``etcdctl del`` of h1's lease: h1 takes the same subnet again (it is free),
   says so once, and the tunnel keeps carrying traffic (the peers see the key
   go and come back; what that costs is measured and bounded).
2. ``etcdctl put`` of another node's value over h1's key: the subnet is not
   free any more, so h1 leases a new one (one line saying so) and restarts its
   dataplane on it; traffic between h2 and h3 is untouched.
"""

from __future__ import annotations

import time

import pytest

from tests.netns.test_faults_common import (
    Traffic,
    lease_key,
    lease_value,
    log_lines,
    no_traceback,
    wait_for,
    world,
)

pytestmark = [pytest.mark.netns("ping", "iperf3", "ss"), pytest.mark.etcd("etcdctl")]

LOST_LINE = "disappeared from etcd"
MAX_GAP = 1.0  # s of lost pings allowed while peers see our key go and come back


def test_lease_deleted_then_overwritten_reacquired_and_logged_once() -> None:
    with world({"h1": "A", "h2": "A", "h3": "A"}) as w:
        lab, cluster = w.lab, w.cluster
        h1, h2, h3 = w.hosts["h1"], w.hosts["h2"], w.hosts["h3"]
        a1 = w.agent("h1")
        key = lease_key("10.7.1.0/24")
        for src, dst in ((h2, h1), (h2, h3)):
            assert src.container_ns and dst.container_ip
            assert lab.wait_ping(src.container_ns, dst.container_ip, deadline=20)
        acquired_before = len(log_lines(a1, "lease acquired: 10.7.1.0/24"))

        # 1. Deleted by hand: the same subnet again.
        traffic = Traffic.start(lab, h2, h1, 10)
        time.sleep(2)
        since = len(a1.log())
        deleted = time.time()
        cluster.etcdctl("del", key)
        took = wait_for(lambda: "10.10.1.1" in cluster.etcdctl("get", key).stdout, 20,
                        "h1's lease back in etcd")
        res = traffic.result()
        assert cluster.status(a1)["node"]["subnet"] == "10.7.1.0/24"
        assert len(log_lines(a1, LOST_LINE, since)) == 1, a1.log()[since:]
        assert len(log_lines(a1, "lease acquired: 10.7.1.0/24", since)) == 1, a1.log()[since:]
        assert len(log_lines(a1, "lease acquired")) == acquired_before + 1
        assert "restarting the dataplane" not in a1.log()
        gap = res.overlay.outage()
        print(f"\nlease deleted: back in etcd {took:.2f} s after the delete; "
              f"{res.summary()}"
              + (f"; gap {gap[0] - deleted:.2f}..{gap[1] - deleted:.2f} s after the delete"
                 if gap else ""))
        assert res.overlay.longest_gap <= MAX_GAP, res.overlay.output
        assert res.overlay.lost - res.underlay.lost <= int(MAX_GAP / 0.2), res.overlay.output
        assert res.tcp.longest_stall <= 2.0 and res.tcp.bytes > 0, res.tcp
        for name in ("h2", "h3"):
            w.cluster.wait_peers(w.agent(name), sorted(
                {"10.7.1.0/24", "10.7.2.0/24", "10.7.3.0/24"} - {w.subnet(name)}), 20)

        # 2. Overwritten by another node: not free, so a new subnet; h2 <-> h3 untouched.
        traffic = Traffic.start(lab, h2, h3, 8)
        time.sleep(2)
        since = len(a1.log())
        cluster.etcdctl("put", key, lease_value("10.10.1.77", "02:aa:bb:cc:dd:ee"))
        doc = cluster.wait_status(a1, lambda d: d["node"]["subnet"] not in (None,
                                                                            "10.7.1.0/24"),
                                  30, "a new subnet")
        new = doc["node"]["subnet"]
        cluster.wait_ready(a1)
        res = traffic.result()
        print(f"lease overwritten: h1 moved to {new}; bystanders h2 -> h3: {res.summary()}")
        assert len(log_lines(a1, LOST_LINE, since)) == 1, a1.log()[since:]
        assert len(log_lines(a1, f"lease acquired: {new}", since)) == 1, a1.log()[since:]
        assert len(log_lines(a1, "restarting the dataplane", since)) == 1, a1.log()[since:]
        assert res.overlay.lost <= res.underlay.lost, res.overlay.output
        assert res.tcp.longest_stall == 0.0 and res.tcp.bytes > 0, res.tcp
        # The other node's value stays; everyone sees h1 at its new subnet.
        assert "10.10.1.77" in cluster.etcdctl("get", key).stdout
        assert "10.10.1.1" in cluster.etcdctl("get", lease_key(new)).stdout
        cluster.wait_peers(a1, ["10.7.1.0/24", "10.7.2.0/24", "10.7.3.0/24"], 20)
        for name in ("h2", "h3"):
            cluster.wait_peers(w.agent(name), sorted(
                {new, "10.7.1.0/24", "10.7.2.0/24", "10.7.3.0/24"} - {w.subnet(name)}), 20)
        for agent in w.agents.values():
            assert agent.running
            no_traceback(agent)
