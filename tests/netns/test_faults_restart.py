"""Fault: the agent is killed with SIGKILL and started again, under constant traffic.

h1, h2 on segment A, h3 on B behind the router; the seed's VxLAN + DirectRouting,
so h1 <-> h2 is a direct kernel route and h1 <-> h3 goes through the engine. While
h1's agent is down its direct route and the peers' state stay (h2 keeps forwarding,
h2 and h3 keep h1 as a peer, the lease stays in etcd); the engine's TUN goes with
the process, so tunnelled traffic stops until the new agent has its TUN back. The
restarted agent keeps its subnet, adopts its routes without duplicating any, and
tunnelled traffic is back within 3 s of the new process starting.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from benchmarks.lab import Host, Lab
from tests.netns.test_faults_common import (
    PREFIX,
    TUN_ROUTE,
    VXLAN_DR,
    Pinger,
    Traffic,
    lease_key,
    no_traceback,
    wait_for,
    world,
)

pytestmark = [pytest.mark.netns("ping", "iperf3", "ss"), pytest.mark.etcd("etcdctl")]

BACK_WITHIN = 3.0  # s from the new process's start until tunnelled traffic flows again
SECONDS = 16  # traffic length: ~3 s before the kill, the fault, ~5 s after


def our_routes(lab: Lab, host: Host) -> list[str]:
    """Every kernel route into the overlay Network on ``host``, whoever installed it
    (the container bridge's own route left out), as ``dst [via gw] dev dev``, sorted."""
    out = lab.ip(host.ns, "-4", "route", "show", "root", "10.7.0.0/16").stdout
    routes = []
    for line in out.splitlines():
        words = line.split()
        if not words or "cni0" in words:
            continue
        keep = [words[0]]
        for key in ("via", "dev"):
            if key in words:
                keep += [key, words[words.index(key) + 1]]
        routes.append(" ".join(keep))
    return sorted(routes)


def test_sigkill_restart_keeps_subnet_and_routes_traffic_back_within_3s() -> None:
    with world({"h1": "A", "h2": "A", "h3": "B"}, VXLAN_DR, 3) as w:
        lab, cluster = w.lab, w.cluster
        h1, h2, h3 = w.hosts["h1"], w.hosts["h2"], w.hosts["h3"]
        assert h1.container_ip and h2.container_ns and h3.container_ns
        direct = f"10.7.2.0/24 via {h2.ip} dev eth0"
        want_routes = sorted([TUN_ROUTE.replace(" scope link", ""), direct])  # each once
        wait_for(lambda: our_routes(lab, h1) == want_routes, 20, "h1's routes")
        for src in (h2, h3):
            assert src.container_ns is not None
            assert lab.wait_ping(src.container_ns, h1.container_ip, deadline=20)
        a1 = w.agent("h1")
        old_mac = cluster.status(a1)["node"]["vtep_mac"]

        tunnel = Traffic.start(lab, h3, h1, SECONDS)  # h3 -> h1 goes through the engine
        direct_ping = Pinger.start(lab, h2.container_ns, str(h1.container_ip),
                                   int(SECONDS / 0.2))
        time.sleep(3)
        os.killpg(a1.proc.pid, signal.SIGKILL)  # the agent's own session (started by us)
        assert a1.proc.wait(10) == -signal.SIGKILL
        killed = time.time()
        time.sleep(1.5)  # down for a while, as after a crash

        # While it is down: the direct route and the peers' state stay, the TUN is gone.
        assert our_routes(lab, h1) == [direct]
        for name in ("h2", "h3"):
            assert "10.7.1.0/24" in w.peers(name), name
        assert "10.10.1.1" in cluster.etcdctl("get", lease_key("10.7.1.0/24")).stdout
        down_for = time.time() - killed

        started = time.time()
        a1b = cluster.start_agent(h1, wait=False)
        w.agents["h1"] = a1b
        cluster.wait_ready(a1b, 30)
        ready_after = time.time() - started
        res = tunnel.result()
        direct_res = direct_ping.result()

        doc = cluster.status(a1b)
        assert doc["node"]["subnet"] == "10.7.1.0/24"
        # a new engine with the VtepMAC of the lease we held (as flannel's kept flannel.1):
        # the peers need nothing new from etcd before traffic flows again
        assert doc["node"]["vtep_mac"] == old_mac
        assert "reusing VtepMAC" in a1b.log()
        assert sorted(p["subnet"] for p in doc["peers"]) == ["10.7.2.0/24", "10.7.3.0/24"]
        # Routes adopted, not duplicated: each destination once, exactly as before.
        routes = our_routes(lab, h1)
        assert routes == want_routes, routes
        assert "adopted route left by an earlier run" in a1b.log()
        # One lease for h1's PublicIP, still the same subnet.
        listing = cluster.etcdctl("get", "--prefix", f"{PREFIX}/subnets/",
                                  "--print-value-only").stdout
        assert listing.count('"PublicIP":"10.10.1.1"') == 1, listing

        # Traffic: the direct path never stopped; the tunnel came back in time.
        assert direct_res.lost <= res.underlay.lost, direct_res.output
        gap = res.overlay.outage()
        assert gap is not None, res.overlay.output  # the TUN went with the process
        back = gap[1] - started
        print(f"\nSIGKILL restart: agent down {down_for:.2f} s, new agent ready "
              f"{ready_after:.2f} s after start; tunnelled traffic stopped "
              f"{gap[1] - gap[0]:.2f} s, back {back:.2f} s after the new process started; "
              f"direct path lost {direct_res.lost}/{direct_res.sent}; {res.summary()}")
        assert back <= BACK_WITHIN, (back, res.overlay.output[-2000:], a1b.log())
        assert res.overlay.replies[max(res.overlay.replies)] > started  # and it stayed up
        assert res.tcp.bytes > 0 and res.tcp.intervals[-1][1] > 0, res.tcp
        for name in ("h1", "h2", "h3"):
            assert w.agent(name).running
            no_traceback(w.agent(name))
