"""What one process wake-up costs on this machine: the yardstick for the RTT column.

A userspace dataplane adds process wake-ups to every round trip (on the bench
topology four: each engine wakes once per direction), and what a wake-up costs
depends on the machine far more than on the dataplane: on a VM whose idle vCPUs
halt (e.g. the ``haltpoll`` cpuidle driver with ``guest_halt_poll_ns`` 0), waking a
process on another, idle CPU is a VM exit and an IPI, tens of µs; on the same CPU it
is a few µs. :func:`measure` times a pipe ping-pong between two processes pinned to
two CPUs (and to one), with a pause between round trips as long as the bench's ping
interval so every wake-up finds an idle CPU, as a ping through the engines does.

No network traffic: two pipes between a parent and its forked child, bounded in
count, the child reaped before returning.
"""

from __future__ import annotations

import os
import time
from typing import Any

ROUNDS = 100


def _pingpong(cpu_parent: int, cpu_child: int, rounds: int, gap_s: float) -> list[float]:
    """Round trips (µs) of one byte parent -> child -> parent, ``gap_s`` apart."""
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: echo ``rounds`` bytes, then leave without cleanup handlers
        try:
            os.sched_setaffinity(0, {cpu_child})
            for _ in range(rounds):
                if not os.read(to_child, 1):
                    break
                os.write(to_parent, b"x")
        finally:
            os._exit(0)
    rtts: list[float] = []
    try:
        os.close(to_child)
        os.close(to_parent)
        own = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu_parent})
        try:
            for _ in range(rounds):
                time.sleep(gap_s)
                t0 = time.perf_counter_ns()
                os.write(from_parent, b"x")
                if not os.read(from_child, 1):
                    break
                rtts.append((time.perf_counter_ns() - t0) / 1000)
        finally:
            os.sched_setaffinity(0, own)
    finally:
        os.close(from_parent)
        os.close(from_child)
        os.waitpid(pid, 0)
    return rtts


def _p50(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[len(s) // 2], 1)


def measure(gap_s: float = 0.01, rounds: int = ROUNDS) -> dict[str, Any]:
    """p50 pipe round trips (two wake-ups each) across two CPUs and on one CPU, in µs."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"gap_s": gap_s, "rounds": rounds}
    out["same_cpu_rtt_us"] = _p50(_pingpong(cpus[0], cpus[0], rounds, gap_s))
    out["cross_cpu_rtt_us"] = (_p50(_pingpong(cpus[0], cpus[-1], rounds, gap_s))
                               if len(cpus) > 1 else None)
    try:
        with open("/sys/devices/system/cpu/cpuidle/current_driver") as f:
            out["cpuidle_driver"] = f.read().strip()
    except OSError:
        out["cpuidle_driver"] = None
    return out


def text(w: Any) -> str:
    """One line for the report's machine paragraph ('' when not measured)."""
    if not isinstance(w, dict) or w.get("same_cpu_rtt_us") is None:
        return ""
    cross = w.get("cross_cpu_rtt_us")
    driver = f", cpuidle {w['cpuidle_driver']}" if w.get("cpuidle_driver") else ""
    gap = f"{float(w.get('gap_s', 0)) * 1000:g} ms"
    if cross is None:
        return (f"Wake-up yardstick: a pipe round trip between two processes {gap} apart "
                f"takes {w['same_cpu_rtt_us']:g} µs on one CPU{driver}.")
    return (f"Wake-up yardstick: a pipe round trip (two wake-ups) between two processes "
            f"{gap} apart takes {cross:g} µs across two idle CPUs and "
            f"{w['same_cpu_rtt_us']:g} µs on one{driver}; a userspace mode adds four "
            f"wake-ups per ping on this topology.")
