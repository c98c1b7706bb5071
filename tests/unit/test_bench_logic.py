"""Pure parts of the benchmark: statistics, the zero-loss search, parsers, derived fields."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import report
from benchmarks.traffic import (
    CpuTimes,
    RateSearch,
    UdpTrial,
    parse_ping_rtts,
    parse_proc_stat_line,
    session_cpu,
    udp_rate_search,
)


# ---- statistics -----------------------------------------------------------------------
def test_percentile_interpolates_between_ranks() -> None:
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile([5.0], 99) == 5.0
    assert report.percentile([1.0, 2.0, 3.0], 0) == 1.0
    assert report.percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert report.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        report.percentile([], 50)
    with pytest.raises(ValueError):
        report.percentile([1.0], 101)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50))
def test_summary_median_lies_within_spread(xs: list[float]) -> None:
    s = report.summarize(xs)
    assert s["min"] <= s["median"] <= s["max"]
    assert s["n"] == len(xs) and s["samples"] == xs


def test_summary_of_nothing_is_explicitly_empty() -> None:
    assert report.summarize([]) == {"median": None, "min": None, "max": None, "n": 0,
                                     "samples": []}


# ---- the zero-loss search against a modelled channel ---------------------------------
def channel(capacity: float, sender_max: float, payload: int = 64):
    """A bottleneck of ``capacity`` pps behind a sender that can do ``sender_max`` pps."""
    def run(offered: float) -> UdpTrial:
        sent = sender_max if offered <= 0 else min(offered, sender_max)
        received = min(sent, capacity)
        loss = 100.0 * (sent - received) / sent
        return UdpTrial(payload, offered, sent, received, loss, int(sent))
    return run


def test_search_stops_after_one_trial_when_the_sender_is_the_limit() -> None:
    s = udp_rate_search(channel(capacity=1e9, sender_max=100_000), RateSearch())
    assert len(s.trials) == 1 and s.sender_limited and s.converged
    assert s.best_pps == 100_000


@given(capacity=st.floats(min_value=1_000, max_value=900_000),
       sender=st.floats(min_value=1_000, max_value=1_000_000),
       tol=st.sampled_from([0.05, 0.1, 0.3]))
def test_search_converges_on_the_channel_capacity(capacity: float, sender: float,
                                                  tol: float) -> None:
    search = udp_rate_search(channel(capacity, sender),
                             RateSearch(tolerance=tol, max_trials=30))
    assert search.converged
    if search.sender_limited:
        assert sender <= capacity / 0.99 + 1e-6
        return
    # The answer passed, lies below the capacity (+1 % loss allowance) and close to it.
    assert search.best_pps <= capacity * 1.0 + 1e-6
    assert search.lo <= capacity / 0.99 + 1e-6 < search.hi + 1e-6
    assert search.best_pps >= capacity * (1 - tol) * 0.99 - 1e-6


def test_search_is_bounded_and_reports_non_convergence() -> None:
    # A channel that drops 50 % at any rate: nothing passes, the search gives up in time.
    def lossy(offered: float) -> UdpTrial:
        sent = 50_000 if offered <= 0 else offered
        return UdpTrial(64, offered, sent, sent / 2, 50.0, int(sent))
    s = udp_rate_search(lossy, RateSearch(max_trials=5))
    assert len(s.trials) == 5 and not s.converged and s.best_pps == 0


def test_search_under_livelock_climbs_above_the_overload_rate() -> None:
    # Under overload this channel delivers only 10k pps, but it carries 40k without loss.
    def livelock(offered: float) -> UdpTrial:
        sent = 500_000 if offered <= 0 else offered
        received = sent if sent <= 40_000 else 10_000
        return UdpTrial(64, offered, sent, received, 100 * (sent - received) / sent, int(sent))
    s = udp_rate_search(livelock, RateSearch(tolerance=0.1, max_trials=20))
    assert s.converged and 36_000 <= s.best_pps <= 40_000


# ---- parsers --------------------------------------------------------------------------
def test_ping_parser_reads_each_reply_and_skips_the_rest() -> None:
    out = ("PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.\n"
           "64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.081 ms\n"
           "64 bytes from 10.244.2.2: icmp_seq=3 ttl=62 time=1.25 ms\n\n"
           "--- 10.244.2.2 ping statistics ---\n"
           "3 packets transmitted, 2 received, 33.3333% packet loss, time 20ms\n"
           "rtt min/avg/max/mdev = 0.081/0.665/1.250/0.584 ms\n")
    assert parse_ping_rtts(out) == [0.081, 1.25]


def test_proc_stat_parser_survives_odd_command_names() -> None:
    line = ("4242 (a) b (c)) S 1 4242 4240 0 -1 4194560 100 0 0 0 "
            "77 33 0 0 20 0 1 0 100 1000 10 18446744073709551615")
    assert parse_proc_stat_line(line) == (4240, 77, 33)


def test_session_cpu_reads_our_own_session() -> None:
    sid = os.getsid(0)
    sum(i * i for i in range(200_000))  # burn a little CPU so the counters move
    cpu = session_cpu([sid])
    assert cpu.total > 0
    assert session_cpu([]) == CpuTimes()


# ---- derived fields and rendering -----------------------------------------------------
def _mode(name: str, tcp1: float, udp64: float, p50: float) -> dict[str, Any]:
    tcp = {str(s): {"gbps": report.summarize([tcp1 * s, tcp1 * s * 1.1]), "bytes_total": 10,
                    "retransmits": [0, 0],
                    "cpu_s_per_gbit": {"attributable": name.startswith("fl"),
                                       "user": report.summarize([0.1]),
                                       "system": report.summarize([0.2])},
                    "host_cpu_s_per_gbit": {k: report.summarize([0.05])
                                            for k in ("user", "system", "softirq")}}
           for s in report.STREAMS}
    udp = {str(p): {"pps": udp64 / (i + 1), "converged": True, "sender_limited": False,
                    "trials": []} for i, p in enumerate(report.PAYLOADS)}
    return {"name": name, "status": "ok", "tcp": tcp, "udp": udp,
            "ping": {"p50_ms": p50, "p99_ms": p50 * 2, "received": 10, "sent": 10}}


def _doc() -> dict[str, Any]:
    return {"schema": report.SCHEMA, "machine": {"cpu_model": "x", "cores": 2, "kernel": "6"},
            "method": {"reps": 2},
            "modes": [_mode("host-gw", 12.0, 100_000, 0.05),
                      _mode("kernel-vxlan", 10.0, 80_000, 0.07),
                      _mode("fl-uvloop", 2.5, 20_000, 0.15),
                      {"name": "fl-directrouting", "status": "not_done",
                       "reason": "agent missing"}]}


def test_finalize_gives_ratios_to_kernel_and_added_latency() -> None:
    doc = report.finalize(_doc())
    ratios = doc["headline"]["ratios"]
    assert ratios["fl-uvloop"]["tcp1_vs_kernel"] == pytest.approx(0.25 * 1.0)
    assert ratios["kernel-vxlan"]["tcp1_vs_kernel"] == pytest.approx(1.0)
    assert ratios["kernel-vxlan"]["udp64_vs_hostgw"] == pytest.approx(0.8)
    assert "fl-directrouting" not in ratios
    fl = next(m for m in doc["modes"] if m["name"] == "fl-uvloop")
    assert fl["ping"]["added_p50_ms"] == pytest.approx(0.10)
    assert fl["ping"]["added_p99_ms"] == pytest.approx(0.20)
    assert report.missing_fields(doc) == []


def test_missing_fields_names_what_is_absent() -> None:
    doc = report.finalize(_doc())
    broken = copy.deepcopy(doc)
    del broken["modes"][2]["udp"]["512"]["converged"]
    del broken["modes"][0]["tcp"]["4"]
    assert report.missing_fields(broken) == ["host-gw.tcp.4", "fl-uvloop.udp.512.converged"]


def test_ratios_are_none_without_an_anchor() -> None:
    doc = _doc()
    doc["modes"] = [m for m in doc["modes"] if m["name"] != "kernel-vxlan"]
    ratios = report.finalize(doc)["headline"]["ratios"]
    assert ratios["fl-uvloop"]["tcp1_vs_kernel"] is None


def test_markdown_has_a_row_per_mode_and_says_not_done() -> None:
    text = report.markdown(report.finalize(_doc()))
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert any(r.startswith("| fl-uvloop | 2.62 (2.50–2.75)") for r in rows)
    assert any(r.startswith("| fl-directrouting | not_done: agent missing") for r in rows)
    assert "| fl-uvloop | 0.25×" in text


def test_write_all_writes_json_table_and_png(tmp_path) -> None:
    if not report.can_plot():
        pytest.skip("needs matplotlib (the [bench] extra)")
    paths = report.write_all(report.finalize(_doc()), str(tmp_path / "out"))
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["md"]) > 0 and os.path.getsize(paths["json"]) > 0


def test_write_all_without_matplotlib_writes_json_and_table(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(report, "can_plot", lambda: False)
    paths = report.write_all(report.finalize(_doc()), str(tmp_path / "out"))
    assert sorted(paths) == ["json", "md"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["modes"]
    assert (tmp_path / "out" / "results.md").read_text()
    assert not (tmp_path / "out" / "results.png").exists()
    assert report.PLOT_NEEDS.endswith("pip install 'flannelette[bench]'")


def test_markdown_scale_table_shows_each_run_and_failures() -> None:
    doc = _doc()
    doc["scale"] = {"status": "ok", "burst": 100, "runs": [
        {"api": "v2", "leases": 1000, "status": "ok", "write_s": 1.0, "programmed_s": 2.5,
         "rss_bytes": 50 * 2**20, "burst_s": 0.75, "rss_after_burst_bytes": 51 * 2**20},
        {"api": "v3", "leases": 5000, "status": "failed", "reason": "agent exited with 1"}]}
    text = report.markdown(report.finalize(doc))
    assert "| v2 | 1000 | 1.0 | 2.50 | 50.0 | 0.75 | 51.0 |" in text
    assert "| v3 | 5000 | failed: agent exited with 1 |" in text
    doc["scale"] = {"status": "not_done", "reason": "no agent"}
    assert "not_done: no agent" in report.markdown(doc)


def test_packet_rate_ratios_say_when_a_side_was_only_a_lower_bound() -> None:
    assert report.ratio_bound(False, True) == "upper"
    assert report.ratio_bound(True, False) == "lower"
    assert report.ratio_bound(True, True) == "none"
    assert report.ratio_bound(False, False) is None
    doc = _doc()
    kernel = next(m for m in doc["modes"] if m["name"] == "kernel-vxlan")
    kernel["udp"]["64"]["sender_limited"] = True
    doc = report.finalize(doc)
    assert doc["headline"]["ratios"]["fl-uvloop"]["udp64_vs_kernel_bound"] == "upper"
    assert doc["headline"]["ratios"]["fl-uvloop"]["udp512_vs_kernel_bound"] is None
    assert "| fl-uvloop | 0.25× | 0.25× | ≤0.25× | 0.25× | 0.25× |" in report.markdown(doc)
    assert "UDP 64 B ≤0.25× kernel" in report.headline_text(doc)
