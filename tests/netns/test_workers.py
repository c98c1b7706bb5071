"""Two hosts, each `flannelette engine --workers 2`: worker processes on a multi-queue TUN
and SO_REUSEPORT sockets.

20 MB over TCP both ways (SHA-256 compared at the far end), four parallel flows
with both workers of each host carrying traffic, one sender's flows spread over the
receiver's workers by its source lanes (and not without them), a worker killed with SIGKILL
restarted (counted, counters kept) with traffic going on, and no worker left
behind when the engine goes, also when the engine itself is SIGKILLed. Two
`flannelette run --workers 2` agents carry traffic and show the pool in /status,
/metrics and a /debug/trace.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cluster import Cluster
from benchmarks.lab import Host, Lab
from tests.netns.test_engine_netns import MAC1, MAC2, start_engine, tcp_transfer, wait_stats

pytestmark = pytest.mark.netns("ping")

PEER1, PEER2 = "10.244.1.0/24", "10.244.2.0/24"


def pool_stats(path: Path) -> dict[str, Any]:
    with open(path) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def both_moved(path: Path, before: list[int] | None = None) -> bool:
    """Each worker slot moved packets (tx or rx) since ``before`` (per-slot totals)."""
    ws = pool_stats(path)["per_worker"]
    now = [w["tx_packets"] + w["rx_packets"] for w in ws]
    base = before or [0] * len(now)
    return len(now) == 2 and all(n > b for n, b in zip(now, base, strict=True))


def parallel(lab: Lab, src: Host, dst: Host, n: int, nbytes: int, port: int) -> None:
    assert src.container_ns and dst.container_ns and dst.container_ip
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        futs = [ex.submit(tcp_transfer, lab, src.container_ns, dst.container_ns,
                          str(dst.container_ip), nbytes, port + i, 10 + i) for i in range(n)]
        for f in futs:
            sent, received = f.result()
            assert sent == received and sent.startswith(str(nbytes))


@pytest.fixture(params=["off", "on"], ids=["offload-off", "offload-on"])
def pools(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest
          ) -> tuple[Lab, Host, Host, Path, Path]:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", PEER1)
    h2 = lab.add_host("h2", "A", PEER2)
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    extra = ["--workers", "2", "--offload", request.param, "--healthz-port", "0"]
    start_engine(lab, h1, MAC1, [(h2, MAC2)], s1, *extra)
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2, *extra)
    return lab, h1, h2, s1, s2


def test_two_workers_carry_tcp_both_ways_and_parallel_flows(
        pools: tuple[Lab, Host, Host, Path, Path]) -> None:
    lab, h1, h2, s1, s2 = pools
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    for s in (s1, s2):
        doc = pool_stats(s)
        assert doc["workers"] == 2 and doc["worker_restarts"] == 0
        assert all(w["alive"] and w["pid"] for w in doc["per_worker"])
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns, str(h2.container_ip),
                                  20 << 20)
    assert sent == received and sent.startswith(str(20 << 20))
    sent, received = tcp_transfer(lab, h2.container_ns, h1.container_ns, str(h1.container_ip),
                                  20 << 20, seed=2)
    assert sent == received and sent.startswith(str(20 << 20))
    # Four flows at once, in both directions: the kernel spreads flows over the TUN queues
    # and the receivers' sockets by their hashes, so both workers of each host carry some.
    # A hash can put every flow of a round on one worker; a few rounds make that unlikely.
    for rnd in range(4):
        parallel(lab, h1, h2, 4, 5 << 20, 6000 + 10 * rnd)
        parallel(lab, h2, h1, 4, 5 << 20, 6100 + 10 * rnd)
        time.sleep(0.5)  # a stats push
        if both_moved(s1) and both_moved(s2):
            break
    for s in (s1, s2):
        ws = pool_stats(s)["per_worker"]
        assert all(w["tx_packets"] + w["rx_packets"] > 0 for w in ws), ws
    st1 = wait_stats(s1, lambda s: s.peers[PEER2].tx_bytes > 40 << 20)
    assert st1.peers[PEER2].tx_bytes > 40 << 20 and st1.peers[PEER2].rx_bytes > 40 << 20
    doc = pool_stats(s1)
    assert sum(w["tx_bytes"] for w in doc["per_worker"]) == doc["peers"][PEER2]["tx_bytes"]
    assert doc["worker_restarts"] == 0 and doc["drops"].get("no_route", 0) == 0


def test_killed_worker_is_restarted_and_traffic_continues(
        pools: tuple[Lab, Host, Host, Path, Path]) -> None:
    lab, h1, h2, s1, _ = pools
    assert h1.container_ns and h2.container_ns and h2.container_ip
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns, str(h2.container_ip))
    assert sent == received
    time.sleep(0.5)
    before = pool_stats(s1)
    victim = before["per_worker"][0]["pid"]
    assert alive(victim)
    os.kill(victim, signal.SIGKILL)  # a worker of the engine this test started
    end = time.monotonic() + 20
    while True:
        doc = pool_stats(s1)
        w0 = doc["per_worker"][0]
        if doc["worker_restarts"] == 1 and w0["alive"] and w0["pid"] not in (None, victim):
            break
        assert time.monotonic() < end, doc
        time.sleep(0.1)
    assert w0["restarts"] == 1 and not alive(victim)
    tx_before = before["peers"][PEER2]["tx_bytes"]
    assert doc["peers"][PEER2]["tx_bytes"] >= tx_before  # the dead one's counters kept
    assert "flannel.1" in lab.ip(h1.ns, "link", "show").stdout  # the parent held the TUN
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    parallel(lab, h1, h2, 4, 4 << 20, 6200)
    st = wait_stats(s1, lambda s: s.peers[PEER2].tx_bytes > tx_before + (16 << 20))
    assert st.peers[PEER2].tx_bytes > tx_before + (16 << 20)


def test_workers_go_with_the_engine(pools: tuple[Lab, Host, Host, Path, Path]) -> None:
    lab, h1, h2, s1, s2 = pools
    engines = {p.args[3]: p for p in lab.procs
               if isinstance(p.args, list) and "--subnet" in p.args}
    w1 = [w["pid"] for w in pool_stats(s1)["per_worker"]]
    w2 = [w["pid"] for w in pool_stats(s2)["per_worker"]]
    assert all(alive(p) for p in w1 + w2)
    assert lab.stop(engines[h1.ns]) == 0  # SIGTERM to the group: one orderly stop
    assert not any(alive(p) for p in w1)
    assert "flannel.1" not in lab.ip(h1.ns, "link", "show").stdout
    assert pool_stats(s1)["worker_restarts"] == 0
    engines[h2.ns].kill()  # the parent alone, SIGKILLed: its workers follow
    engines[h2.ns].wait(5)
    end = time.monotonic() + 10
    while any(alive(p) for p in w2):
        assert time.monotonic() < end, "workers outlived their parent"
        time.sleep(0.1)
    end = time.monotonic() + 10
    while "flannel.1" in lab.ip(h2.ns, "link", "show").stdout:
        assert time.monotonic() < end, "TUN outlived the engine and its workers"
        time.sleep(0.1)


@pytest.mark.parametrize("ports", [8, 0], ids=["source-ports-8", "source-ports-0"])
def test_source_ports_spread_one_senders_flows_over_the_receivers_workers(
        lab: Lab, tmp_path: Path, ports: int) -> None:
    """A one-process sender (tunnel GSO where the kernel has it) and a receiver with two
    SO_REUSEPORT workers: with source lanes a sender's flows arrive on both workers; with
    every datagram from port 8472 the 4-tuple is one and so is the receiving worker."""
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", PEER1)
    h2 = lab.add_host("h2", "A", PEER2)
    assert h1.container_ns and h2.container_ip
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    start_engine(lab, h1, MAC1, [(h2, MAC2)], s1, "--offload", "on", "--source-ports",
                 str(ports), "--healthz-port", "0")
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2, "--workers", "2", "--offload", "on",
                 "--healthz-port", "0")
    sender = pool_stats(s1)
    lane_ports = [int(p) for p in sender["source_ports"].split(",")]
    assert len(set(lane_ports)) == max(ports, 1)
    assert lane_ports == [8472] if ports == 0 else 8472 not in lane_ports
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    rx: list[int] = []
    for rnd in range(4):  # a round's flows may all hash to one worker; a few make it unlikely
        parallel(lab, h1, h2, 6, 2 << 20, 6200 + 10 * rnd)
        time.sleep(0.6)  # a stats push
        rx = [w["rx_packets"] for w in pool_stats(s2)["per_worker"]]
        if ports == 0 or all(rx):
            break
    if ports:
        assert all(n > 0 for n in rx), rx
    else:
        assert sorted(n > 0 for n in rx) == [False, True], rx


@pytest.mark.etcd("etcdctl")
def test_agents_with_two_workers(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ns and h2.container_ip and h1.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config('{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}', api=3)
        a1 = cluster.start_agent(h1, "--workers", "2", api="v3", timeout=60.0)
        a2 = cluster.start_agent(h2, api="v3", env={"FLANNELD_WORKERS": "2"}, timeout=60.0)
        for agent, peer in ((a1, "10.7.2.0/24"), (a2, "10.7.1.0/24")):
            doc = cluster.wait_peers(agent, [peer], timeout=60.0)
            assert [p["path"] for p in doc["peers"]] == ["vxlan"]
        assert lab.wait_ping(h1.container_ns, h2.container_ip)
        sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns,
                                      str(h2.container_ip), 8 << 20)
        assert sent == received and sent.startswith(str(8 << 20))
        doc = cluster.wait_status(
            a1, lambda d: d["peers"][0]["tx_bytes"] > 8 << 20, what="tx counters")
        eng = doc["engine"]
        assert eng["workers"] == 2 and eng["worker_restarts"] == 0
        assert [w["alive"] for w in eng["per_worker"]] == [True, True]
        assert sum(w["tx_bytes"] for w in eng["per_worker"]) == doc["peers"][0]["tx_bytes"]
        text = cluster.metrics(a1)
        assert "flannelette_engine_workers 2.0" in text
        assert "flannelette_engine_worker_restarts 0.0" in text
        # a trace through the pool: records from the workers, merged in the parent
        pinger = lab.popen(h1.container_ns, "ping", "-n", "-c", "20", "-i", "0.2",
                           str(h2.container_ip), stdout=subprocess.DEVNULL)
        try:
            code, body = cluster.fetch(a1, "/debug/trace?count=3&duration=10&filter=icmp",
                                       timeout=15.0)
        finally:
            lab.stop(pinger)
        assert code == 200, body
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        assert lines[-1]["end"] == "bound reached" and lines[-1]["records"] == 3, lines
        assert len({r["packet_id"] for r in lines[:-1]}) == 3
