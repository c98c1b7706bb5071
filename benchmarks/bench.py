"""`flannelette bench`: every dataplane mode side by side, same topology, same traffic.

Every mode gets its own, identical lab (see :mod:`benchmarks.modes`); all are set
up first, then measured interleaved: warm-up, ping RTTs in rounds, iperf3 TCP with 1 and
4 streams (each repetition visits every mode in turn), and a zero-loss UDP
packet-rate search per payload size. Afterwards the control plane is measured at
scale (:mod:`benchmarks.scale`). The results go to ``--out`` as JSON (the source
of truth), a Markdown table and, with the ``[bench]`` extra (matplotlib), a PNG
plot; the headline is each mode's ratio to
the kernel VXLAN mode of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import report, traffic
from benchmarks.lab import Lab, LabError
from benchmarks.modes import Mode, ModeUnavailable, Pair, all_modes, build_pair


@dataclass(frozen=True)
class Plan:
    """How much traffic to run per mode."""

    reps: int
    warmup_seconds: int
    tcp_seconds: int
    udp_trial_seconds: int
    udp_max_trials: int
    udp_tolerance: float
    udp_loss_limit_percent: float
    ping_count: int
    ping_interval_s: float
    payloads: tuple[int, ...] = report.PAYLOADS
    streams: tuple[int, ...] = report.STREAMS


QUICK = Plan(reps=1, warmup_seconds=1, tcp_seconds=1, udp_trial_seconds=1, udp_max_trials=6,
             udp_tolerance=0.3, udp_loss_limit_percent=1.0, ping_count=50,
             ping_interval_s=0.01)
FULL = Plan(reps=3, warmup_seconds=3, tcp_seconds=8, udp_trial_seconds=2, udp_max_trials=8,
            udp_tolerance=0.1, udp_loss_limit_percent=1.0, ping_count=300,
            ping_interval_s=0.01)


class BenchError(RuntimeError):
    """A bad flag or a missing tool: one clear message, no traceback."""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    iperf = subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                           timeout=10).stdout.splitlines()
    return {"cpu_model": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "iperf3": iperf[0] if iperf else "?",
            "loadavg_at_start": os.getloadavg()[0]}


def _per_gbit(secs: float, nbytes: int) -> float:
    gbit = nbytes * 8 / 1e9
    return secs / gbit if gbit > 0 else 0.0


class ModeRun:
    """One mode's lab, dataplane processes and results while the run goes on.

    Every phase catches its own failures: a mode that breaks is reported as
    failed with the reason, and the other modes carry on.
    """

    def __init__(self, mode: Mode, plan: Plan, log: Callable[[str], None]) -> None:
        self.mode, self.plan, self.log = mode, plan, log
        self.entry: dict[str, Any] = {"name": mode.name, "description": mode.description}
        self.lab = Lab()
        self.pair: Pair | None = None
        self.procs: list[subprocess.Popen[Any]] = []
        self.tcp_runs: dict[int, list[traffic.TcpRun]] = {s: [] for s in plan.streams}
        self.udp_searches: dict[int, list[traffic.RateSearch]] = {p: [] for p in plan.payloads}
        self.rtts: list[float] = []  # every ping round's RTTs (ms), pooled
        self.pings_sent = 0

    @property
    def ok(self) -> bool:
        return "status" not in self.entry

    def _fail(self, status: str, reason: str) -> None:
        self.entry.update(status=status, reason=reason)
        self.log(f"  {self.mode.name}: {status}: {reason}")

    def phase(self, fn: Callable[[], None]) -> None:
        """Run one phase unless the mode already failed; turn errors into a status."""
        if not self.ok:
            return
        try:
            fn()
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise traffic.TrafficError(f"dataplane process {dead[0].pid} exited with "
                                           f"{dead[0].returncode} (see the logs directory)")
        except ModeUnavailable as e:
            self._fail("not_done", str(e))
        except (traffic.TrafficError, LabError, subprocess.TimeoutExpired, OSError) as e:
            self._fail("failed", str(e))
        except Exception as e:  # a mode's own setup code failing must not end the run
            self._fail("failed", f"{type(e).__name__}: {e}")

    # ---- phases -----------------------------------------------------------------------
    def setup(self, log_dir: str) -> None:
        t0 = time.monotonic()
        self.lab.__enter__()
        pair = self.pair = build_pair(self.lab, log_dir, self.mode.name)
        self.procs = self.mode.setup(pair)
        if not self.lab.wait_ping(pair.client_ns, pair.server_ip, deadline=30.0):
            raise traffic.TrafficError(f"no ping from {pair.client_ns} to {pair.server_ip} "
                                       "within 30 s after setup")
        self.entry["setup_seconds"] = time.monotonic() - t0
        if self.mode.userspace:
            paths = self._tx_paths()
            self.entry["tx_path"] = paths
            if paths:
                self.log(f"  {self.mode.name}: tx path " + ", ".join(
                    f"{h} {p}" for h, p in sorted(paths.items())))
        traffic.start_iperf_server(self.lab, pair.server_ns, pair.server_ip)

    def _tx_paths(self) -> dict[str, str]:
        """How each host's engine sends (its /status ``engine.tx_path``: tunnel-gso,
        tso-split+udp-gso, udp-gso, per-datagram), for hosts that serve one."""
        assert self.pair is not None
        probe = ("import json, urllib.request\n"
                 "d = json.load(urllib.request.urlopen('http://127.0.0.1:9480/status', "
                 "timeout=3))\nprint((d.get('engine') or {}).get('tx_path') or '')")
        paths: dict[str, str] = {}
        for host in (self.pair.client, self.pair.server):
            res = self.lab.run(host.ns, sys.executable, "-c", probe, check=False, timeout=15)
            if res.returncode == 0 and res.stdout.strip():
                paths[host.name] = res.stdout.strip()
        return paths

    def _tcp(self, streams: int, seconds: int) -> traffic.TcpRun:
        assert self.pair is not None
        return traffic.iperf_tcp(self.lab, self.pair.client_ns, self.pair.server_ip,
                                 streams=streams, seconds=seconds,
                                 dataplane_sessions=[p.pid for p in self.procs])

    def warmup(self) -> None:
        assert self.pair is not None
        self._tcp(1, self.plan.warmup_seconds)
        self.log(f"  {self.mode.name}: warm-up done")

    def ping_round(self, count: int) -> None:
        """``count`` pings on the idle path; the RTTs of all rounds are pooled."""
        assert self.pair is not None
        rtts = traffic.ping_rtts(self.lab, self.pair.client_ns, self.pair.server_ip,
                                 count=count, interval=self.plan.ping_interval_s)
        self.rtts.extend(rtts)
        self.pings_sent += count
        pooled = self.rtts
        self.entry["ping"] = {"sent": self.pings_sent, "received": len(pooled),
                              "p50_ms": report.percentile(pooled, 50) if pooled else None,
                              "p99_ms": report.percentile(pooled, 99) if pooled else None,
                              "rounds": self.entry.get("ping", {}).get("rounds", 0) + 1}
        self.log(f"  {self.mode.name}: ping round p50 "
                 f"{report.percentile(rtts, 50) if rtts else None} ms")

    def tcp_rep(self) -> None:
        for s in self.plan.streams:
            self.tcp_runs[s].append(self._tcp(s, self.plan.tcp_seconds))
            self.log(f"  {self.mode.name}: TCP x{s} {self.tcp_runs[s][-1].gbps:.2f} Gbit/s")

    def udp_rep(self) -> None:
        """One zero-loss search per payload size."""
        assert self.pair is not None
        pair, plan = self.pair, self.plan
        for payload in plan.payloads:
            search = traffic.RateSearch(loss_limit=plan.udp_loss_limit_percent,
                                        tolerance=plan.udp_tolerance,
                                        max_trials=plan.udp_max_trials)

            def trial(pps: float, payload: int = payload) -> traffic.UdpTrial:
                return traffic.iperf_udp(self.lab, pair.client_ns, pair.server_ip,
                                         payload=payload, pps=pps,
                                         seconds=plan.udp_trial_seconds)

            traffic.udp_rate_search(trial, search)
            self.udp_searches[payload].append(search)
            self.log(f"  {self.mode.name}: UDP {payload} B {search.best_pps:.0f} pps "
                     f"({len(search.trials)} trials, converged={search.converged})")

    def _udp_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for payload, searches in self.udp_searches.items():
            found = [s.best_pps for s in searches if s.best_pps > 0]
            out[str(payload)] = {
                "pps": report.percentile(found, 50) if found else None,
                "pps_summary": report.summarize(found),
                "converged": bool(searches) and all(s.converged for s in searches),
                "sender_limited": bool(searches) and all(s.sender_limited for s in searches),
                "searches": [{"pps": s.best_pps, "converged": s.converged,
                              "sender_limited": s.sender_limited,
                              "highest_passing_offered_pps": s.lo,
                              "lowest_failing_offered_pps": s.hi,
                              "trials": len(s.trials)} for s in searches],
                "trials": [asdict(t) for s in searches for t in s.trials]}
        return out

    def finish(self) -> dict[str, Any]:
        """Summarize the TCP runs, close the lab, return the report entry."""
        if self.ok:
            self.entry["tcp"] = {}
            for s, rs in self.tcp_runs.items():
                self.entry["tcp"][str(s)] = {
                    "gbps": report.summarize(r.gbps for r in rs),
                    "bytes_total": sum(r.bytes for r in rs),
                    "retransmits": [r.retransmits for r in rs],
                    "cpu_s_per_gbit": {
                        "attributable": self.mode.userspace,
                        "user": report.summarize(_per_gbit(r.dataplane_cpu.user, r.bytes)
                                                 for r in rs),
                        "system": report.summarize(_per_gbit(r.dataplane_cpu.system, r.bytes)
                                                   for r in rs)},
                    "host_cpu_s_per_gbit": {
                        k: report.summarize(_per_gbit(getattr(r.host_cpu, k), r.bytes)
                                            for r in rs)
                        for k in ("user", "system", "softirq")},
                }
            self.entry["udp"] = self._udp_summary()
            self.entry["status"] = "ok"
        self.close()
        return self.entry

    def close(self) -> None:
        if self.pair is not None:
            self.pair.close()
        self.lab.close()


def run_modes(modes: list[Mode], plan: Plan, log: Callable[[str], None],
              log_dir: str) -> list[dict[str, Any]]:
    """All modes set up side by side (each in its own identical lab), then measured
    interleaved: every TCP repetition visits every mode in turn, so a burst of noise
    on this shared machine spreads over all modes instead of biasing one."""
    runs = [ModeRun(m, plan, log) for m in modes]
    try:
        for r in runs:
            log(f"== {r.mode.name}: {r.mode.description}")
            r.phase(functools.partial(r.setup, log_dir))
        for r in runs:
            r.phase(r.warmup)
        # Pings in rounds, every mode in turn: the RTT of an idle path swings with what
        # the rest of the host does (a cold wake-up of a halted vCPU), so one block per
        # mode would hand one mode a quiet minute and another a busy one.
        rounds = max(1, min(plan.reps * 2, plan.ping_count // 25))
        for k in range(rounds):
            count = plan.ping_count // rounds + (1 if k < plan.ping_count % rounds else 0)
            for r in runs:
                r.phase(functools.partial(r.ping_round, count))
        for rep in range(plan.reps):
            log(f"== TCP repetition {rep + 1}/{plan.reps}")
            for r in runs:
                r.phase(r.tcp_rep)
        for rep in range(plan.reps):
            log(f"== UDP zero-loss search, repetition {rep + 1}/{plan.reps}")
            for r in runs:
                r.phase(r.udp_rep)
        return [r.finish() for r in runs]
    finally:
        for r in runs:
            r.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flannelette bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few seconds per mode (CI); numbers are indicative only")
    p.add_argument("--out", default="bench-results", help="output directory (default %(default)s)")
    p.add_argument("--modes", default="",
                   help="comma-separated mode names to run (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the modes and exit")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default 1 quick, 3 full)")
    p.add_argument("--tcp-seconds", type=int, default=0, help="length of each iperf3 TCP run")
    p.add_argument("--no-scale", action="store_true", help="skip the control-plane scale part")
    p.add_argument("--scale-leases", default="",
                   help="comma-separated lease counts (default 1000,5000; quick 100)")
    return p.parse_args(argv)


def _check_environment() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, TUN devices, routes)")
    for tool in ("ip", "iperf3", "ping", "ss"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (run `bash scripts/quickstart.sh setup`)")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    """Run the benchmark; 0 when every mode that exists measured, 1 when one failed."""
    args = parse_args(argv)
    modes = all_modes()
    if args.list:
        for m in modes:
            print(f"{m.name:<24} {m.description}")
        return 0
    try:
        if args.modes:
            wanted = [x.strip() for x in args.modes.split(",") if x.strip()]
            unknown = sorted(set(wanted) - {m.name for m in modes})
            if unknown:
                raise BenchError(f"unknown mode(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(m.name for m in modes)}")
            modes = [m for m in modes if m.name in wanted]
        if args.reps < 0 or args.tcp_seconds < 0:
            raise BenchError("--reps and --tcp-seconds must be positive")
        _check_environment()
    except BenchError as e:
        print(f"flannelette bench: {e}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every lab, engine, agent and etcd is removed.
    signal.signal(signal.SIGTERM, _terminate)
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = Plan(**{**asdict(plan), "reps": args.reps})
    if args.tcp_seconds:
        plan = Plan(**{**asdict(plan), "tcp_seconds": args.tcp_seconds})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    doc: dict[str, Any] = {
        "schema": report.SCHEMA, "quick": args.quick,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "method": asdict(plan), "modes": []}
    from benchmarks import wakeup

    doc["machine"]["wakeup"] = wakeup.measure(plan.ping_interval_s,
                                              rounds=20 if args.quick else wakeup.ROUNDS)
    doc["modes"] = run_modes(modes, plan, log, os.path.join(args.out, "logs"))
    if not args.no_scale:
        from benchmarks import scale

        doc["scale"] = scale.run(args.scale_leases, quick=args.quick, log=log,
                                 log_dir=os.path.join(args.out, "logs"))
    doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    doc["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    report.finalize(doc)
    paths = report.write_all(doc, args.out)
    print(report.markdown(doc))
    print(report.headline_text(doc))
    print(f"\nresults: {', '.join(paths.values())}")
    if "png" not in paths:
        print(f"no results.png: {report.PLOT_NEEDS}")
    return 1 if any(m["status"] == "failed" for m in doc["modes"]) else 0
