"""Statistics and rendering of a benchmark run: JSON document -> Markdown table, PNG plot.

The JSON document built by :mod:`benchmarks.bench` is the one source of truth;
everything here is derived from it, so a table or a plot can be rebuilt later
from a stored ``results.json`` alone. The statistics and the derived fields are
pure functions (unit-tested without root); only :func:`write_all` touches files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from benchmarks import wakeup

SCHEMA = "flannelette-bench/1"
ANCHOR = "kernel-vxlan"  # ratios in the headline are to this mode of the same run
LIMIT = "host-gw"  # added latency is measured against this mode
PAYLOADS = (64, 512, 1400)
STREAMS = (1, 4)


# ---- statistics -----------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Iterable[float]) -> dict[str, Any]:
    """Median and spread (min, max) of repeated measurements, samples kept for re-analysis."""
    xs = [float(x) for x in samples]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": percentile(xs, 50), "min": min(xs), "max": max(xs), "n": len(xs),
            "samples": xs}


def _median(d: Mapping[str, Any] | None) -> float | None:
    if not d:
        return None
    v = d.get("median")
    return float(v) if isinstance(v, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---- derived fields -------------------------------------------------------------------
def metric(mode: Mapping[str, Any], name: str) -> float | None:
    """One headline number of a mode: tcp1, tcp4 (Gbit/s), udp64/udp512/udp1400 (pps),
    ping_p50/ping_p99 (ms); None if the mode did not produce it."""
    if name.startswith("tcp"):
        return _median(mode.get("tcp", {}).get(name[3:], {}).get("gbps"))
    if name.startswith("udp"):
        entry = mode.get("udp", {}).get(name[3:])
        return float(entry["pps"]) if entry and entry.get("pps") is not None else None
    if name.startswith("ping_"):
        v = mode.get("ping", {}).get(f"{name[5:]}_ms")
        return float(v) if v is not None else None
    raise KeyError(name)


HEADLINE_METRICS = ("tcp1", "tcp4", "udp64", "udp512", "udp1400")


def finalize(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the derived fields: added latency vs host-gw and ratios to the kernel VXLAN mode."""
    modes = {m["name"]: m for m in doc.get("modes", [])}
    limit, anchor = modes.get(LIMIT), modes.get(ANCHOR)
    for m in modes.values():
        ping = m.get("ping")
        if ping and limit is not None and limit.get("ping"):
            for q in ("p50", "p99"):
                a, b = ping.get(f"{q}_ms"), limit["ping"].get(f"{q}_ms")
                ping[f"added_{q}_ms"] = a - b if a is not None and b is not None else None
    headline: dict[str, dict[str, float | str | None]] = {}
    for name, m in modes.items():
        if m.get("status") != "ok":
            continue
        row: dict[str, float | str | None] = {}
        for k in HEADLINE_METRICS:
            row[f"{k}_vs_kernel"] = (_ratio(metric(m, k), metric(anchor, k))
                                     if anchor is not None else None)
            row[f"{k}_vs_hostgw"] = (_ratio(metric(m, k), metric(limit, k))
                                     if limit is not None else None)
            if k.startswith("udp") and anchor is not None:
                row[f"{k}_vs_kernel_bound"] = ratio_bound(
                    _sender_limited(m, k), _sender_limited(anchor, k))
        headline[name] = row
    doc["headline"] = {"anchor": ANCHOR, "limit": LIMIT, "ratios": headline}
    return doc


def _sender_limited(mode: Mapping[str, Any], name: str) -> bool:
    return bool(mode.get("udp", {}).get(name[3:], {}).get("sender_limited"))


def ratio_bound(mode_limited: bool, anchor_limited: bool) -> str | None:
    """What a packet-rate ratio is when a side's rate is only a lower bound (the sender
    was the limit): "upper" (the true ratio is at most this), "lower", "none" (both
    bounds: the ratio says nothing), or None (both measured: an estimate)."""
    if mode_limited and anchor_limited:
        return "none"
    if anchor_limited:
        return "upper"
    if mode_limited:
        return "lower"
    return None


_BOUND_MARK = {"upper": "≤", "lower": "≥", "none": "~"}


def missing_fields(doc: Mapping[str, Any]) -> list[str]:
    """Names of required fields absent from a finished document (empty when complete).

    Required for every mode whose status is "ok": TCP at 1 and 4 streams with
    bytes and Gbit/s, CPU per Gbit, UDP at every payload with pps, convergence and
    trials, ping p50/p99 and added latency.
    """
    out: list[str] = []
    for key in ("schema", "machine", "method", "modes", "headline"):
        if key not in doc:
            out.append(key)
    for key in ("cpu_model", "cores", "kernel"):
        if key not in doc.get("machine", {}):
            out.append(f"machine.{key}")
    for m in doc.get("modes", []):
        if m.get("status") != "ok":
            continue
        n = m.get("name", "?")
        for s in STREAMS:
            t = m.get("tcp", {}).get(str(s))
            if t is None:
                out.append(f"{n}.tcp.{s}")
                continue
            for key in ("gbps", "bytes_total", "retransmits", "cpu_s_per_gbit",
                        "host_cpu_s_per_gbit"):
                if key not in t:
                    out.append(f"{n}.tcp.{s}.{key}")
        for p in PAYLOADS:
            u = m.get("udp", {}).get(str(p))
            if u is None:
                out.append(f"{n}.udp.{p}")
                continue
            for key in ("pps", "converged", "sender_limited", "trials"):
                if key not in u:
                    out.append(f"{n}.udp.{p}.{key}")
        for key in ("p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms", "received"):
            if key not in m.get("ping", {}):
                out.append(f"{n}.ping.{key}")
    return out


# ---- Markdown -------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _spread(d: Mapping[str, Any] | None) -> str:
    if not d or d.get("median") is None:
        return "–"
    if d.get("n", 0) <= 1:
        return f"{d['median']:.2f}"
    return f"{d['median']:.2f} ({d['min']:.2f}–{d['max']:.2f})"


def _kpps(v: float | None, converged: bool | None, sender_limited: bool | None,
          spread: Mapping[str, Any] | None = None) -> str:
    if v is None:
        return "–"
    text = ("≥" if sender_limited else "") + f"{v / 1000:.0f}k" + ("" if converged else "?")
    if spread and spread.get("n", 0) > 1:
        text += f" ({spread['min'] / 1000:.0f}–{spread['max'] / 1000:.0f}k)"
    return text


def markdown(doc: Mapping[str, Any]) -> str:
    """The results as Markdown: machine, method, one row per mode, headline ratios, scale."""
    mach, meth = doc.get("machine", {}), doc.get("method", {})
    lines = [
        f"Machine: {mach.get('cpu_model', '?')}, {mach.get('cores', '?')} cores, "
        f"kernel {mach.get('kernel', '?')}, Python {mach.get('python', '?')}, "
        f"{mach.get('iperf3', 'iperf3 ?')}.",
        *([line] if (line := wakeup.text(mach.get("wakeup"))) else []),
        f"Method: {meth.get('reps', '?')} repetitions after {meth.get('warmup_seconds', '?')} s "
        f"warm-up, modes interleaved; TCP runs of {meth.get('tcp_seconds', '?')} s; "
        f"one UDP search per repetition with "
        f"{meth.get('udp_trial_seconds', '?')} s trials (< {meth.get('udp_loss_limit_percent')}"
        f" % loss, tolerance {meth.get('udp_tolerance')}); {meth.get('ping_count', '?')} pings."
        f" Median (min–max).",
        "",
        "| mode | TCP×1 Gbit/s | TCP×4 Gbit/s | UDP 64 B pps | UDP 512 B pps | UDP 1400 B pps "
        "| RTT p50 / p99 µs | +RTT vs host-gw µs | dataplane CPU s/Gbit usr+sys "
        "| host CPU s/Gbit usr+sys+sirq |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in doc.get("modes", []):
        if m.get("status") != "ok":
            lines.append(f"| {m['name']} | {m.get('status')}: {m.get('reason', '')} "
                         "| | | | | | | | |")
            continue
        tcp, udp, ping = m.get("tcp", {}), m.get("udp", {}), m.get("ping", {})
        cells = [m["name"], _spread(tcp.get("1", {}).get("gbps")),
                 _spread(tcp.get("4", {}).get("gbps"))]
        for p in PAYLOADS:
            u = udp.get(str(p), {})
            cells.append(_kpps(u.get("pps"), u.get("converged"), u.get("sender_limited"),
                               u.get("pps_summary")))
        p50, p99 = ping.get("p50_ms"), ping.get("p99_ms")
        cells.append(f"{_fmt(p50 and p50 * 1000, '.0f')} / {_fmt(p99 and p99 * 1000, '.0f')}")
        a50 = ping.get("added_p50_ms")
        cells.append(_fmt(a50 * 1000 if a50 is not None else None, "+.0f"))
        cpu = tcp.get("1", {}).get("cpu_s_per_gbit", {})
        cells.append(f"{_fmt(_median(cpu.get('user')), '.3f')}+"
                     f"{_fmt(_median(cpu.get('system')), '.3f')}"
                     if cpu.get("attributable") else "kernel")
        hc = tcp.get("1", {}).get("host_cpu_s_per_gbit", {})
        cells.append(f"{_fmt(_median(hc.get('user')), '.3f')}+"
                     f"{_fmt(_median(hc.get('system')), '.3f')}+"
                     f"{_fmt(_median(hc.get('softirq')), '.3f')}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("`≥` before a packet rate: the sender (iperf3 on one core) was the limit, "
                 "not the dataplane. `?` after it: the zero-loss search did not converge in its "
                 "trials. CPU columns are for the single-stream TCP run; host CPU includes "
                 "iperf3 on both ends.")
    head = doc.get("headline", {}).get("ratios", {})
    if head:
        lines += ["", f"Ratios to {ANCHOR} of the same run (host-gw is the limit):", "",
                  "| mode | TCP×1 | TCP×4 | UDP 64 B | UDP 512 B | UDP 1400 B |",
                  "|---|---|---|---|---|---|"]
        for name, row in head.items():
            cells = [name]
            for k in HEADLINE_METRICS:
                v = row.get(f"{k}_vs_kernel")
                mark = _BOUND_MARK.get(str(row.get(f"{k}_vs_kernel_bound")), "")
                cells.append(mark + _fmt(v if isinstance(v, float) else None, ".2f") + "×")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "`≤`: the kernel's rate was only a lower bound (its sender was the "
                  "limit), so the true ratio is at most this; `≥` the other way round; "
                  "`~`: both were sender-limited, the ratio says nothing about the dataplanes."]
    scale = doc.get("scale")
    if scale:
        lines += ["", "Control-plane scale (one agent, N leases already in etcd):", ""]
        if scale.get("status") != "ok":
            lines.append(f"{scale.get('status')}: {scale.get('reason', '')}")
        else:
            lines += ["| API | leases | written in s | all peers programmed s | agent RSS MiB "
                      f"| burst of {scale.get('burst', 100)} changes applied s "
                      "| RSS after burst MiB |", "|---|---|---|---|---|---|---|"]
            for r in scale.get("runs", []):
                if r.get("status") != "ok":
                    lines.append(f"| {r.get('api')} | {r.get('leases')} | {r.get('status')}: "
                                 f"{r.get('reason', '')} | | | | |")
                    continue
                rss, rss2 = r.get("rss_bytes"), r.get("rss_after_burst_bytes")
                lines.append(f"| {r['api']} | {r['leases']} | {_fmt(r.get('write_s'), '.1f')} "
                             f"| {_fmt(r.get('programmed_s'))} | "
                             f"{_fmt(rss / 2**20 if rss else None, '.1f')} | "
                             f"{_fmt(r.get('burst_s'))} | "
                             f"{_fmt(rss2 / 2**20 if rss2 else None, '.1f')} |")
    return "\n".join(lines) + "\n"


def headline_text(doc: Mapping[str, Any]) -> str:
    """One paragraph for the terminal: how the userspace modes compare with the kernel."""
    head = doc.get("headline", {}).get("ratios", {})
    modes = {m["name"]: m for m in doc.get("modes", [])}
    out: list[str] = []
    for name, row in head.items():
        m = modes[name]
        mark = _BOUND_MARK.get(str(row.get("udp64_vs_kernel_bound")), "")
        out.append(f"{name:<18} TCP×1 {_fmt(metric(m, 'tcp1'))} Gbit/s "
                   f"= {_fmt(row.get('tcp1_vs_kernel'))}× kernel VXLAN, "
                   f"{_fmt(row.get('tcp1_vs_hostgw'))}× host-gw; "
                   f"UDP 64 B {mark}{_fmt(row.get('udp64_vs_kernel'))}× kernel")
    scale = doc.get("scale") or {}
    for r in scale.get("runs", []):
        if r.get("status") == "ok":
            out.append(f"control plane, etcd {r['api']}: {r['leases']} peers programmed "
                       f"{_fmt(r.get('programmed_s'))} s after start, agent RSS "
                       f"{_fmt(r.get('rss_bytes', 0) / 2**20, '.0f')} MiB, "
                       f"{scale.get('burst', 100)} changes applied in "
                       f"{_fmt(r.get('burst_s'))} s")
        else:
            out.append(f"control plane, etcd {r.get('api')}: {r.get('leases')} peers: "
                       f"{r.get('status')}: {r.get('reason', '')}")
    if scale.get("status") in ("not_done", "failed"):
        out.append(f"control plane: {scale['status']}: {scale.get('reason', '')}")
    return "\n".join(out)


# ---- plot -----------------------------------------------------------------------------
PLOT_NEEDS = "the plot needs matplotlib: pip install 'flannelette[bench]'"


def can_plot() -> bool:
    """matplotlib is the ``[bench]`` extra: a plain install still measures and reports."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(doc: Mapping[str, Any], path: str) -> None:
    """A PNG with TCP throughput and UDP packet rate per mode (median, min–max bars)."""
    import matplotlib  # the optional [bench] extra: imported only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in doc.get("modes", []) if m.get("status") == "ok"]
    names = [m["name"] for m in modes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.38
    for i, s in enumerate(STREAMS):
        meds, errs_lo, errs_hi = [], [], []
        for m in modes:
            g = m.get("tcp", {}).get(str(s), {}).get("gbps") or {}
            med = float(g.get("median") or 0.0)
            meds.append(med)
            errs_lo.append(med - float(g.get("min") or med))
            errs_hi.append(float(g.get("max") or med) - med)
        xs = [x + (i - 0.5) * width for x in range(len(modes))]
        bars = ax1.bar(xs, meds, width, yerr=[errs_lo, errs_hi], capsize=3,
                       label=f"TCP, {s} stream{'s' if s > 1 else ''}")
        ax1.bar_label(bars, fmt="%.2f", fontsize=7)
    ax1.set_xticks(range(len(modes)), names, rotation=25, ha="right", fontsize=8)
    ax1.set_ylabel("Gbit/s (iperf3, median, min–max)")
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    width = 0.27
    for i, p in enumerate(PAYLOADS):
        entries = [m.get("udp", {}).get(str(p), {}) for m in modes]
        vals = [(u.get("pps") or 0.0) / 1000 for u in entries]
        xs = [x + (i - 1) * width for x in range(len(modes))]
        bars = ax2.bar(xs, vals, width, label=f"UDP {p} B payload")
        for bar, u in zip(bars, entries, strict=True):
            if u.get("sender_limited"):  # a lower bound: the sender, not the dataplane
                bar.set_hatch("//")
        ax2.bar_label(bars, labels=[("≥" if u.get("sender_limited") else "") + f"{v:.0f}"
                                    for u, v in zip(entries, vals, strict=True)], fontsize=7)
    ax2.set_xticks(range(len(modes)), names, rotation=25, ha="right", fontsize=8)
    ax2.set_ylabel("kpackets/s at < 1 % loss (hatched ≥: sender-limited)")
    ax2.set_title("Packet rate")
    ax2.legend(fontsize=8)
    mach = doc.get("machine", {})
    fig.suptitle(f"flannelette bench{' (quick)' if doc.get('quick') else ''}: "
                 f"{mach.get('cpu_model', '?')}, {mach.get('cores', '?')} cores, "
                 f"kernel {mach.get('kernel', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(doc: Mapping[str, Any], out_dir: str) -> dict[str, str]:
    """Write results.json, results.md and (with matplotlib) results.png into ``out_dir``;
    return the paths written, by kind."""
    os.makedirs(out_dir, exist_ok=True)
    kinds = ("json", "md", "png") if can_plot() else ("json", "md")
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in kinds}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(doc))
    if "png" in paths:
        plot(doc, paths["png"])
    return paths
