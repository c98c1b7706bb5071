"""Soak: two vxlan agents under steady ping + TCP traffic and peer churn, resources sampled.

Every second a fake peer lease (flannel's value format, a PublicIP nobody has) is
written with etcdctl and the one written three seconds earlier removed, so each
agent adds and removes a peer (routes, engine table) every second. Meanwhile the
agents' RSS (/proc/PID/status VmRSS) and open descriptors (/proc/PID/fd) are sampled.

Checked: RSS stays within ±10 % of its value after the warm-up, descriptors do not
grow, and the packet counters add up per engine (every packet read from the TUN is
sent or a named drop; across the tunnel, what one engine sent the other received
or dropped by name), with no ping lost.

FLANNELETTE_SOAK_SECONDS (default 60) sets the length; FLANNELETTE_SOAK_REPORT names
a file for the samples and totals as JSON (docs/operations.md has a 10 min run).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import threading
import time
from typing import Any

import pytest

from benchmarks.cluster import AgentProcess, Cluster
from benchmarks.lab import Lab
from control.lease import LeaseAttrs, encode_attrs

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
PREFIX = "/coreos.com/network"
SECONDS = int(os.environ.get("FLANNELETTE_SOAK_SECONDS", "60"))
WARMUP = max(15.0, SECONDS * 0.25)
SAMPLE_EVERY = 2.0
FAKE_LIVE = 3  # fake peers alive at once


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert m is not None
    return int(m.group(1))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fake_lease(i: int) -> tuple[str, str]:
    """Key and value of fake peer ``i``: 10.7.(100+i%100).0/24 at 10.10.1.(100+i%100)."""
    n = 100 + i % 100
    mac = bytes([0x02, 0, 0, 0, 0x5A, n])
    value = encode_attrs(LeaseAttrs(ipaddress.IPv4Address(f"10.10.1.{n}"), "vxlan", 1, mac))
    return f"{PREFIX}/subnets/10.7.{n}.0-24", value


def check_counters(name: str, doc: dict[str, Any]) -> dict[str, int]:
    """One engine's counters add up: TUN reads = sent + named tx drops; and nothing
    failed below us (send, TUN write and read, UDP receive)."""
    eng, drops = doc["engine"], doc["drops"]
    for reason in ("send_failed", "tun_write_failed", "tun_read_failed", "udp_recv_failed"):
        assert drops[reason] == 0, (name, reason, drops)
    tx = sum(p["tx_packets"] for p in doc["peers"])
    rx = sum(p["rx_packets"] for p in doc["peers"])
    tx_drops = sum(n for _, _, d, n in eng["peer_drops"] if d == "tx")
    rx_drops = sum(n for _, _, d, n in eng["peer_drops"] if d == "rx")
    assert sum(drops.values()) == tx_drops + rx_drops, (name, drops, eng["peer_drops"])
    # A TUN read is one packet, or (offload on) a TCP super-packet that left as
    # tso_segments / tunnel_gso_segments datagrams: count reads in those units.
    reads = (eng["tun_packets"] - eng["tso_splits"] + eng["tso_segments"]
             - eng["tunnel_gso_writes"] + eng["tunnel_gso_segments"])
    assert reads == tx + tx_drops, (name, eng["tun_packets"], reads, tx, tx_drops)
    # A UDP GRO receive may carry many datagrams: at least one outcome per receive.
    assert rx + rx_drops + eng["arp_replies"] >= eng["udp_packets"], (name, eng, rx)
    return {"tun_packets": eng["tun_packets"], "udp_receives": eng["udp_packets"],
            "tx_packets": tx, "rx_packets": rx, "tx_drops": tx_drops, "rx_drops": rx_drops}


def peer(doc: dict[str, Any], subnet: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in doc["peers"] if p["subnet"] == subnet]
    assert found, (subnet, doc["peers"])
    return found[0]


def rx_drops_from(doc: dict[str, Any], subnet: str) -> int:
    return sum(n for _, p, d, n in doc["engine"]["peer_drops"] if p == subnet and d == "rx")


def test_soak_traffic_and_peer_churn_resources_flat_counters_add_up(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN)
        agents = [cluster.start_agent(h1), cluster.start_agent(h2)]
        cluster.wait_peers(agents[0], ["10.7.2.0/24"])
        cluster.wait_peers(agents[1], ["10.7.1.0/24"])
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        pids = [a.proc.pid for a in agents]
        for pid in pids:  # `ip netns exec` execs: the Popen pid is the agent itself
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                assert b"control.cli\0run" in cmdline.read()

        server = lab.popen(h2.container_ns, "iperf3", "-s", "-1", "-B", str(h2.container_ip),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        pings = int(SECONDS * 10)
        ping = lab.popen(h1.container_ns, "ping", "-n", "-q", "-i", "0.1", "-c", str(pings),
                         "-W", "1", str(h2.container_ip), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        tcp = lab.popen(h1.container_ns, "iperf3", "-c", str(h2.container_ip), "-t",
                        str(SECONDS), "-b", "40M", "-J", stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)

        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        churn_errors: list[str] = []

        def churn() -> None:
            i = 0
            while not stop.is_set():
                key, value = fake_lease(i)
                res = cluster.etcdctl("put", key, value, check=False)
                if res.returncode != 0:
                    churn_errors.append(res.stderr)
                if i >= FAKE_LIVE:
                    old, _ = fake_lease(i - FAKE_LIVE)
                    cluster.etcdctl("del", old, check=False)
                i += 1
                stop.wait(1.0)
            for j in range(max(0, i - FAKE_LIVE), i):  # the last fakes go too
                cluster.etcdctl("del", fake_lease(j)[0], check=False)

        churner = threading.Thread(target=churn, name="soak-churn", daemon=True)
        t0 = time.monotonic()
        churner.start()
        try:
            while time.monotonic() - t0 < SECONDS:
                samples.append({"t": round(time.monotonic() - t0, 1),
                                "rss_kib": [rss_kib(p) for p in pids],
                                "fds": [fds(p) for p in pids]})
                time.sleep(SAMPLE_EVERY)
        finally:
            stop.set()
            churner.join(30)
        ping_out, _ = ping.communicate(timeout=SECONDS + 30)
        tcp_out, _ = tcp.communicate(timeout=60)
        lab.stop(server)
        for a in agents:  # the fakes are gone again: the real peer alone
            cluster.wait_peers(a, ["10.7.2.0/24" if a is agents[0] else "10.7.1.0/24"])
        time.sleep(2.0)  # nothing in flight
        docs = [cluster.status(a) for a in agents]
        final = {"rss_kib": [rss_kib(p) for p in pids], "fds": [fds(p) for p in pids]}

        report = soak_report(agents, samples, final, docs, ping_out, tcp_out, churn_errors)
        if os.environ.get("FLANNELETTE_SOAK_REPORT"):
            with open(os.environ["FLANNELETTE_SOAK_REPORT"], "w") as f:
                json.dump(report, f, indent=1)
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))

        assert not churn_errors, churn_errors[:3]
        assert report["ping_loss_pct"] == 0.0, ping_out
        assert report["tcp_mbit_s"] > 5, tcp_out[-2000:]
        for i, a in enumerate(agents):
            log = a.log()
            assert "Traceback" not in log, log[-4000:]
            for verb in ("added", "removed"):  # the churn reached this agent
                fakes = re.findall(rf"peer {verb}: 10\.7\.1\d\d\.0/24", log)
                assert len(fakes) >= SECONDS * 0.6, (a.host.name, verb, len(fakes))
            base = report["baseline"]
            for s in samples:
                if s["t"] >= WARMUP:
                    assert abs(s["rss_kib"][i] - base["rss_kib"][i]) <= 0.10 * base["rss_kib"][i], \
                        (a.host.name, s, base)
            assert final["fds"][i] <= base["fds"][i] + 2, (a.host.name, final, base)
        # Across the tunnel: what h1 sent to h2 h2 received or dropped by name, and back.
        for src, dst, dst_doc, src_doc in (("10.7.1.0/24", "10.7.2.0/24", docs[1], docs[0]),
                                           ("10.7.2.0/24", "10.7.1.0/24", docs[0], docs[1])):
            sent = peer(src_doc, dst)["tx_packets"]
            got = peer(dst_doc, src)["rx_packets"] + rx_drops_from(dst_doc, src)
            assert got == sent, (src, dst, sent, got)


def soak_report(agents: list[AgentProcess], samples: list[dict[str, Any]],
                final: dict[str, Any], docs: list[dict[str, Any]], ping_out: str,
                tcp_out: str, churn_errors: list[str]) -> dict[str, Any]:
    """Totals and per-engine counters (check_counters asserts their identities)."""
    after = [s for s in samples if s["t"] >= WARMUP]
    assert after, "the soak is shorter than its warm-up"
    base = after[0]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_out)
    assert m is not None, ping_out
    sent, received = int(m.group(1)), int(m.group(2))
    try:
        mbit = json.loads(tcp_out)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        mbit = 0.0
    return {
        "seconds": SECONDS, "warmup_s": WARMUP,
        "baseline": {"rss_kib": base["rss_kib"], "fds": base["fds"]},
        "rss_kib_min_max_after_warmup": [[min(s["rss_kib"][i] for s in after),
                                          max(s["rss_kib"][i] for s in after)]
                                         for i in range(len(agents))],
        "fds_min_max_after_warmup": [[min(s["fds"][i] for s in after),
                                      max(s["fds"][i] for s in after)]
                                     for i in range(len(agents))],
        "final": final,
        "ping_sent": sent, "ping_received": received,
        "ping_loss_pct": round(100.0 * (sent - received) / max(1, sent), 3),
        "tcp_mbit_s": round(mbit, 1),
        "peer_changes_logged": [a.log().count("peer added") + a.log().count("peer removed")
                                for a in agents],
        "counters": [check_counters(a.host.name, d) for a, d in zip(agents, docs, strict=True)],
        "churn_errors": len(churn_errors),
        "samples": samples,
    }
