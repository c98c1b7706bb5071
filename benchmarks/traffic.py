"""Traffic generators and meters for the benchmark: iperf3, ping, a UDP rate search, CPU.

Every run is bounded twice: by its own length (iperf3 ``-t``, ping ``-c``) and by a
subprocess timeout. Servers and clients run only inside lab namespaces and talk to
lab addresses; servers are started with :meth:`Lab.popen`, so the lab stops them.

CPU cost is read from ``/proc``: per dataplane process (every process in the
session of a process the lab started, so workers forked by an engine count too),
and machine-wide from ``/proc/stat`` (which also sees kernel softirq work that no
process is charged for, e.g. the kernel's own VXLAN).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.lab import Lab

IPERF_PORT = 5201
UDP_SOCKET_BUFFER = "2M"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class TrafficError(RuntimeError):
    """A measurement could not run (tool failed, no answer); the message says which."""


# ---- CPU accounting -------------------------------------------------------------------
@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds spent in user and kernel (system) mode."""

    user: float = 0.0
    system: float = 0.0

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.system - other.system)

    @property
    def total(self) -> float:
        return self.user + self.system


@dataclass(frozen=True)
class HostCpu:
    """Machine-wide CPU seconds from /proc/stat: user (+nice), system, softirq + irq."""

    user: float = 0.0
    system: float = 0.0
    softirq: float = 0.0

    def __sub__(self, other: HostCpu) -> HostCpu:
        return HostCpu(self.user - other.user, self.system - other.system,
                       self.softirq - other.softirq)


def parse_proc_stat_line(line: str) -> tuple[int, int, int]:
    """(session id, utime ticks, stime ticks) from one /proc/<pid>/stat line.

    The command name may hold spaces and parentheses, so fields are counted from
    the last ')'.
    """
    rest = line[line.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); session is field 6, utime 14, stime 15.
    return int(rest[3]), int(rest[11]), int(rest[12])


def session_cpu(sessions: Iterable[int]) -> CpuTimes:
    """CPU time of every live process whose session id is in ``sessions``."""
    wanted = set(sessions)
    user = system = 0
    if not wanted:
        return CpuTimes()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                sid, ut, st = parse_proc_stat_line(f.read())
        except (OSError, ValueError, IndexError):
            continue  # the process went away between listdir and open
        if sid in wanted:
            user += ut
            system += st
    return CpuTimes(user / CLK_TCK, system / CLK_TCK)


def host_cpu() -> HostCpu:
    """The machine's aggregate CPU counters (all cores) from /proc/stat."""
    with open("/proc/stat") as f:
        first = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    v = [int(x) for x in first[1:8]]
    return HostCpu((v[0] + v[1]) / CLK_TCK, v[2] / CLK_TCK, (v[5] + v[6]) / CLK_TCK)


# ---- iperf3 ---------------------------------------------------------------------------
def start_iperf_server(lab: Lab, ns: str, ip: str, port: int = IPERF_PORT,
                       deadline: float = 10.0) -> subprocess.Popen[Any]:
    """A persistent iperf3 server bound to ``ip`` inside ``ns``; returns once it listens."""
    proc = lab.popen(ns, "iperf3", "-s", "-B", ip, "-p", str(port),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise TrafficError(f"iperf3 server in {ns} exited with {proc.returncode}")
        out = lab.run(ns, "ss", "-Hltn", f"sport = :{port}", check=False).stdout
        if out.strip():
            return proc
        time.sleep(0.05)
    raise TrafficError(f"iperf3 server in {ns} did not listen on {ip}:{port} in {deadline}s")


def _iperf_client(lab: Lab, ns: str, server_ip: str, args: list[str], seconds: int,
                  port: int) -> dict[str, Any]:
    argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "5000", *args]
    try:
        res = lab.run(ns, *argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired as e:
        raise TrafficError(f"iperf3 {' '.join(args)} did not finish in {seconds + 30}s") from e
    try:
        doc: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise TrafficError(f"iperf3 {' '.join(args)} gave no JSON (rc {res.returncode}): "
                           f"{res.stderr.strip()[:200]}") from e
    if "error" in doc:
        raise TrafficError(f"iperf3 {' '.join(args)}: {doc['error']}")
    return doc


@dataclass(frozen=True)
class TcpRun:
    """One iperf3 TCP run, with the CPU it cost."""

    streams: int
    seconds: float
    bytes: int  # received by the server
    gbps: float
    retransmits: int
    dataplane_cpu: CpuTimes  # processes of the dataplane (zero for kernel modes)
    host_cpu: HostCpu  # the whole machine, iperf3 included


def iperf_tcp(lab: Lab, ns: str, server_ip: str, *, streams: int, seconds: int,
              dataplane_sessions: Iterable[int] = (), port: int = IPERF_PORT) -> TcpRun:
    """Bulk TCP from ``ns`` to ``server_ip`` with ``streams`` parallel connections."""
    sessions = list(dataplane_sessions)
    cpu0, host0 = session_cpu(sessions), host_cpu()
    doc = _iperf_client(lab, ns, server_ip, ["-P", str(streams)], seconds, port)
    cpu1, host1 = session_cpu(sessions), host_cpu()
    rcv, snt = doc["end"]["sum_received"], doc["end"]["sum_sent"]
    return TcpRun(streams, float(rcv["seconds"]), int(rcv["bytes"]),
                  float(rcv["bits_per_second"]) / 1e9, int(snt.get("retransmits", 0)),
                  cpu1 - cpu0, host1 - host0)


@dataclass(frozen=True)
class UdpTrial:
    """One UDP run at an offered rate (0 = as fast as the sender can)."""

    payload: int
    offered_pps: float
    sent_pps: float
    received_pps: float
    loss_percent: float
    packets: int  # sent


def iperf_udp(lab: Lab, ns: str, server_ip: str, *, payload: int, pps: float, seconds: int,
              port: int = IPERF_PORT) -> UdpTrial:
    """UDP datagrams of ``payload`` bytes at ``pps`` (0 = unlimited); loss as the server saw it."""
    bps = 0 if pps <= 0 else max(1, int(pps * payload * 8))
    # A 2 MB socket buffer (iperf3 applies -w on both ends) absorbs the receiver being
    # descheduled for a few ms on a busy machine: loss then measures the dataplane.
    doc = _iperf_client(lab, ns, server_ip, ["-u", "-l", str(payload), "-b", str(bps),
                                             "-w", UDP_SOCKET_BUFFER], seconds, port)
    snt, rcv = doc["end"]["sum_sent"], doc["end"]["sum_received"]
    packets, lost = int(rcv["packets"]), int(rcv["lost_packets"])
    secs = float(rcv["seconds"]) or 1.0
    return UdpTrial(payload, pps, int(snt["packets"]) / (float(snt["seconds"]) or 1.0),
                    max(0, packets - lost) / secs, float(rcv["lost_percent"]), packets)


# ---- the zero-loss search (pure) ------------------------------------------------------
@dataclass
class RateSearch:
    """Find the highest packet rate with loss below ``loss_limit`` percent, in few trials.

    Trial 1 is unlimited: if even that stays under the limit, the sender is the
    bottleneck and the search is done. Otherwise the rate received under overload
    is a good first guess (90 % of it). From the highest passing rate the search
    gallops upwards (steps of ``tolerance``, doubling after each pass, since a
    livelocked receiver can carry more than it delivers under overload) and
    bisects once a failing rate brackets the answer, until passing and failing
    rates are within ``tolerance`` of each other or ``max_trials`` runs were
    spent. Pure: the caller runs each trial and feeds the result back.
    """

    loss_limit: float = 1.0
    tolerance: float = 0.1
    max_trials: int = 8
    lo: float = 0.0  # highest offered rate that passed
    hi: float = 0.0  # lowest offered rate that failed (0 = none yet)
    best_pps: float = 0.0  # received rate of the best passing trial
    sender_limited: bool = False
    trials: list[UdpTrial] = field(default_factory=list)
    _guess: float = 0.0
    _step: float = 0.0

    @property
    def converged(self) -> bool:
        if self.sender_limited:
            return True
        return self.lo > 0 and self.hi > 0 and (self.hi - self.lo) <= self.tolerance * self.hi

    def next_rate(self) -> float | None:
        """The next offered rate in packets/s (0 = unlimited), or None when done."""
        if not self.trials:
            return 0.0
        if self.converged or len(self.trials) >= self.max_trials:
            return None
        if self._guess > 0:
            rate, self._guess = self._guess, 0.0
            return rate
        if self.lo <= 0:
            return self.hi / 2
        rate = self.lo * (1 + (self._step or self.tolerance))
        return rate if rate < self.hi else (self.lo + self.hi) / 2

    def record(self, trial: UdpTrial) -> None:
        """Feed back the result of the trial run at ``trial.offered_pps``."""
        self.trials.append(trial)
        passed = trial.loss_percent < self.loss_limit and trial.received_pps > 0
        if trial.offered_pps <= 0:  # the unlimited first trial
            if passed:
                self.sender_limited = True
                self.lo = trial.sent_pps
                self.best_pps = trial.received_pps
            else:
                self.hi = trial.sent_pps
                self._guess = max(1.0, 0.9 * trial.received_pps)
            return
        if passed:
            self.lo = max(self.lo, trial.offered_pps)
            self.best_pps = max(self.best_pps, trial.received_pps)
            self._step = 2 * self._step if self._step else self.tolerance
        else:
            self.hi = trial.offered_pps if self.hi <= 0 else min(self.hi, trial.offered_pps)
            self._step = self.tolerance


def udp_rate_search(run_trial: Callable[[float], UdpTrial], search: RateSearch) -> RateSearch:
    """Drive ``search`` with ``run_trial(offered_pps)`` until it is done."""
    while (rate := search.next_rate()) is not None:
        search.record(run_trial(rate))
    return search


# ---- ping -----------------------------------------------------------------------------
def parse_ping_rtts(output: str) -> list[float]:
    """Round-trip times in ms from ping's per-reply lines (``time=0.042 ms``)."""
    rtts = []
    for line in output.splitlines():
        i = line.find("time=")
        if i >= 0:
            rtts.append(float(line[i + 5:].split()[0]))
    return rtts


def ping_rtts(lab: Lab, ns: str, dst: str, *, count: int, interval: float = 0.01) -> list[float]:
    """``count`` echo round trips (ms) from ``ns`` to ``dst``; lost replies are missing."""
    timeout = count * (interval + 0.01) + 15
    try:
        res = lab.run(ns, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1",
                      dst, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TrafficError(f"ping {dst} did not finish in {timeout:.0f}s") from e
    return parse_ping_rtts(res.stdout)
