"""The bench's wake-up yardstick: real pipe round trips (no network), and its report line."""

from __future__ import annotations

import os

from benchmarks import report, wakeup


def test_measure_times_real_round_trips() -> None:
    w = wakeup.measure(gap_s=0.001, rounds=10)
    assert w["rounds"] == 10 and w["gap_s"] == 0.001
    assert 0 < w["same_cpu_rtt_us"] < 1e6
    if len(os.sched_getaffinity(0)) > 1:
        assert 0 < w["cross_cpu_rtt_us"] < 1e6
    else:
        assert w["cross_cpu_rtt_us"] is None


def test_the_report_names_the_yardstick() -> None:
    w = {"gap_s": 0.01, "rounds": 100, "same_cpu_rtt_us": 5.2, "cross_cpu_rtt_us": 114.0,
         "cpuidle_driver": "haltpoll"}
    line = wakeup.text(w)
    assert "114 µs across two idle CPUs" in line and "5.2 µs on one" in line
    assert "cpuidle haltpoll" in line and "10 ms apart" in line
    doc = {"machine": {"cpu_model": "X", "cores": 2, "wakeup": w}, "method": {}, "modes": []}
    assert line in report.markdown(doc)
    assert wakeup.text(None) == "" and wakeup.text({"same_cpu_rtt_us": None}) == ""
    assert "Wake-up" not in report.markdown({"machine": {}, "method": {}, "modes": []})
