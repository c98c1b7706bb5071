"""Fault: the TUN device deleted under a running agent. The engine notices (EBADFD on
its reads), the supervisor builds a new engine and TUN, the route step routes the
Network into it again, and pings flow again, under constant ping traffic."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from benchmarks.cluster import Cluster
from benchmarks.lab import Lab

pytestmark = [pytest.mark.netns("ping"), pytest.mark.etcd("etcdctl")]
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'


def test_deleted_tun_is_recreated_and_traffic_comes_back(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN, api=3)
        a1 = cluster.start_agent(h1)
        a2 = cluster.start_agent(h2)
        cluster.wait_peers(a1, ["10.7.2.0/24"])
        cluster.wait_peers(a2, ["10.7.1.0/24"])
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        # 15 s of pings at 0.1 s (bounded), the TUN deleted 3 s in.
        ping = lab.popen(h1.container_ns, "ping", "-n", "-i", "0.1", "-c", "150", "-W", "1",
                         str(h2.container_ip), stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        deleted = time.monotonic()
        lab.ip(h1.ns, "link", "del", "flannel.1")
        back = None
        while time.monotonic() - deleted < 20:
            if lab.ping(h1.container_ns, h2.container_ip, count=1, timeout=1).returncode == 0:
                back = time.monotonic() - deleted
                break
            time.sleep(0.1)
        out, _ = ping.communicate(timeout=40)
        assert back is not None, a1.log()
        assert back < 5.0, f"traffic back only after {back:.1f} s"
        lost = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert lost is not None
        sent, received = int(lost.group(1)), int(lost.group(2))
        assert sent - received <= 50, out  # at most ~5 s of pings lost
        log = a1.log()
        assert log.count("VXLAN engine stopped: TUN flannel.1 is gone") == 1, log
        assert "VXLAN engine replaced" in log and "Traceback" not in log
        routes = lab.ip(h1.ns, "route", "show", "10.7.0.0/16").stdout
        assert "dev flannel.1" in routes
        print(f"TUN deleted: traffic back after {back:.2f} s, {sent - received} of {sent} "
              "pings lost")
