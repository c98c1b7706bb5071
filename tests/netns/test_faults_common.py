"""Shared pieces of the fault tests (issue 13): a lab of agents, constant traffic, logs.

No tests here; each ``test_faults_<fault>.py`` holds one fault. While a fault is
injected, :class:`Traffic` runs three bounded streams: a 5 pps ping between two
containers over the overlay, the same ping between their hosts over the
underlay (what "the network itself" loses on this machine), and a
rate-limited iperf3 TCP stream between the containers (``-t`` seconds, 0.5 s
intervals, so a stall shows as intervals without bytes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks.cluster import AgentProcess, Cluster
from benchmarks.lab import Host, Lab
from benchmarks.traffic import start_iperf_server

PREFIX = "/coreos.com/network"
CONFIG_KEY = f"{PREFIX}/config"
NETWORK = "10.7.0.0/16"
VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
VXLAN_DR = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'
TUN_ROUTE = f"{NETWORK} dev flannel.1 scope link"
INTERVAL = 0.2  # ping interval during a fault (the 0.2 s)
TCP_RATE = "20M"  # enough to see a stall, little enough to leave the 2 cores to the agents


def lease_key(subnet: str) -> str:
    net, plen = subnet.split("/")
    return f"{PREFIX}/subnets/{net}-{plen}"


def lease_value(public_ip: str, mac: str) -> str:
    """A vxlan lease value byte for byte as flannel writes it."""
    return (f'{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> float:
    """Poll ``cond()`` until true; the seconds it took. AssertionError after ``timeout``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - start


# ---- traffic ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PingResult:
    """Replies of one bounded ping: sequence number -> wall-clock time of the reply."""

    sent: int
    replies: dict[int, float]
    output: str

    @property
    def lost(self) -> int:
        return self.sent - len(self.replies)

    def outage(self) -> tuple[float, float] | None:
        """(last reply before, first reply after) the longest run of lost pings."""
        seqs = sorted(self.replies)
        best: tuple[float, float] | None = None
        for a, b in itertools.pairwise(seqs):
            if b - a > 1 and (best is None or self.replies[b] - self.replies[a] >
                              best[1] - best[0]):
                best = (self.replies[a], self.replies[b])
        return best

    @property
    def longest_gap(self) -> float:
        """Seconds without replies in the longest outage (0 when nothing was lost)."""
        gap = self.outage()
        return 0.0 if gap is None else gap[1] - gap[0]


@dataclass
class Pinger:
    """``ping -D -i INTERVAL -c count`` in the background, from ``ns`` to ``dst``."""

    proc: subprocess.Popen[str]
    count: int

    @classmethod
    def start(cls, lab: Lab, ns: str, dst: str, count: int) -> Pinger:
        proc = lab.popen(ns, "ping", "-n", "-D", "-c", str(count), "-i", str(INTERVAL),
                         "-W", "1", dst, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        return cls(proc, count)

    def result(self) -> PingResult:
        out, _ = self.proc.communicate(timeout=self.count * INTERVAL + 30)
        replies = {int(m.group(2)): float(m.group(1)) for m in re.finditer(
            r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", out, re.M)}
        return PingResult(self.count, replies, out)


@dataclass(frozen=True)
class TcpResult:
    """One iperf3 TCP run: bytes the server received, per-interval bytes."""

    bytes: int
    intervals: list[tuple[float, int]]  # (interval length s, bytes sent in it)
    retransmits: int

    @property
    def longest_stall(self) -> float:
        """The longest run of intervals that carried no bytes, in seconds."""
        best = run = 0.0
        for length, n in self.intervals:
            run = run + length if n == 0 else 0.0
            best = max(best, run)
        return best


@dataclass
class TcpStream:
    """A bounded, rate-limited iperf3 TCP stream (client in the background)."""

    proc: subprocess.Popen[str]
    seconds: int

    @classmethod
    def start(cls, lab: Lab, src: Host, dst: Host, seconds: int, port: int = 5201
              ) -> TcpStream:
        assert src.container_ns and dst.container_ns and dst.container_ip
        start_iperf_server(lab, dst.container_ns, str(dst.container_ip), port)
        proc = lab.popen(src.container_ns, "iperf3", "-c", str(dst.container_ip),
                         "-p", str(port), "-t", str(seconds), "-b", TCP_RATE, "-i", "0.5",
                         "-J", "--connect-timeout", "5000", stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        return cls(proc, seconds)

    def result(self) -> TcpResult:
        out, _ = self.proc.communicate(timeout=self.seconds + 40)
        try:
            doc: dict[str, Any] = json.loads(out)
        except ValueError:
            raise AssertionError(f"iperf3 gave no JSON (rc {self.proc.returncode}): "
                                 f"{out[-1000:]}") from None
        assert "error" not in doc, doc["error"]
        intervals = [(float(i["sum"]["seconds"]), int(i["sum"]["bytes"]))
                     for i in doc["intervals"]]
        return TcpResult(int(doc["end"]["sum_received"]["bytes"]), intervals,
                         int(doc["end"]["sum_sent"].get("retransmits", 0)))


@dataclass(frozen=True)
class TrafficResult:
    overlay: PingResult
    underlay: PingResult
    tcp: TcpResult

    def summary(self) -> str:
        return (f"overlay ping lost {self.overlay.lost}/{self.overlay.sent} "
                f"(longest gap {self.overlay.longest_gap:.2f} s), underlay ping lost "
                f"{self.underlay.lost}/{self.underlay.sent}; TCP {self.tcp.bytes / 1e6:.1f} MB, "
                f"longest stall {self.tcp.longest_stall:.1f} s, "
                f"{self.tcp.retransmits} retransmits")


@dataclass
class Traffic:
    """Constant traffic from ``src``'s container to ``dst``'s for ``seconds``."""

    overlay: Pinger
    underlay: Pinger
    tcp: TcpStream
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, lab: Lab, src: Host, dst: Host, seconds: float) -> Traffic:
        assert src.container_ns and dst.container_ip
        count = int(seconds / INTERVAL)
        return cls(Pinger.start(lab, src.container_ns, str(dst.container_ip), count),
                   Pinger.start(lab, src.ns, str(dst.ip), count),
                   TcpStream.start(lab, src, dst, max(1, int(seconds))))

    def result(self) -> TrafficResult:
        return TrafficResult(self.overlay.result(), self.underlay.result(), self.tcp.result())


# ---- a lab of agents ----------------------------------------------------------------------
@dataclass
class World:
    """A lab, its etcd, and one agent per host."""

    lab: Lab
    cluster: Cluster
    hosts: dict[str, Host]
    agents: dict[str, AgentProcess]

    def agent(self, name: str) -> AgentProcess:
        return self.agents[name]

    def subnet(self, name: str) -> str:
        return str(self.hosts[name].subnet)

    def peers(self, name: str) -> list[str]:
        return sorted(p["subnet"] for p in self.cluster.status(self.agents[name])["peers"])

    def wait_mesh(self, timeout: float = 40.0) -> None:
        """Every agent lists every other host as a peer."""
        for name, agent in self.agents.items():
            others = [self.subnet(o) for o in self.agents if o != name]
            self.cluster.wait_peers(agent, others, timeout)


@contextlib.contextmanager
def world(layout: Mapping[str, str], config: str = VXLAN, api: int = 3, *flags: str,
          etcd: bool = True) -> Iterator[World]:
    """Hosts ``name -> segment`` (segment A 10.10.1.0/24, B 10.10.2.0/24 behind the
    router), host i with container subnet 10.7.i.0/24; etcd with ``config`` (when
    ``etcd``) and agents started with ``flags``; all of it removed afterwards. The
    tools it needs are named by the modules' markers (conftest checks them)."""
    with Lab() as lab:
        for seg in sorted(set(layout.values())):
            lab.add_segment(seg, {"A": "10.10.1.0/24", "B": "10.10.2.0/24"}[seg])
        hosts = {name: lab.add_host(name, seg, f"10.7.{i}.0/24")
                 for i, (name, seg) in enumerate(layout.items(), start=1)}
        with Cluster(lab) as cluster:
            w = World(lab, cluster, hosts, {})
            if etcd:
                cluster.start_etcd()
                cluster.set_config(config, api=api)
                for name in hosts:
                    w.agents[name] = cluster.start_agent(hosts[name], *flags, wait=False)
                for agent in w.agents.values():
                    cluster.wait_ready(agent, 60)
                w.wait_mesh()
            yield w


def log_lines(agent: AgentProcess, text: str, since: int = 0) -> list[str]:
    """Lines of the agent's log (from character ``since``) that contain ``text``."""
    return [line for line in agent.log()[since:].splitlines() if text in line]


def problems(agent: AgentProcess, since: int = 0) -> list[str]:
    """WARNING and ERROR lines of the agent's log from character ``since``."""
    return [line for line in agent.log()[since:].splitlines()
            if " WARNING " in line or " ERROR " in line]


def no_traceback(agent: AgentProcess) -> None:
    assert "Traceback" not in agent.log(), agent.log()[-4000:]
