"""`flannelette bench --quick`: every mode really runs and the report is complete.

Numbers are not asserted (a shared 2-core machine is noisy); what is asserted is
that each measurement happened: every mode the tree has (flannelette's included;
one missing or not done is a failure) moved bytes, the zero-loss search
converged, and the JSON, the table and (with matplotlib) the plot were written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from benchmarks import report
from benchmarks.modes import all_modes

pytestmark = [pytest.mark.netns("iperf3", "ping", "ss"), pytest.mark.etcd("etcdctl")]


def test_bench_quick_runs_every_mode(tmp_path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "control.cli", "bench", "--quick",
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()  # bench unwinds on SIGTERM: labs, engines, agents, etcd removed
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench --quick took over 900 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert report.missing_fields(doc) == []
    assert (out / "results.md").stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"

    # Every mode of this tree must run and move bytes; a missing one is a failure, so
    # the test cannot pass without running flannelette.
    expected = [m.name for m in all_modes()]
    assert {"fl-uvloop", "fl-uvloop-offload", "fl-offload-partial",
            "fl-directrouting"} <= set(expected), expected
    modes = {m["name"]: m for m in doc["modes"]}
    assert sorted(modes) == sorted(expected)
    for name in expected:
        m = modes[name]
        assert m["status"] == "ok", (name, m.get("reason"))
        for streams in ("1", "4"):
            assert m["tcp"][streams]["bytes_total"] > 0, (name, streams)
        for payload, u in m["udp"].items():
            assert u["converged"], (name, payload, u["trials"])
            assert u["pps"] > 0 and any(t["received_pps"] > 0 for t in u["trials"])
        assert m["ping"]["received"] > 0, name
    assert modes["host-gw"]["status"] == "ok"
    scale = doc["scale"]
    assert {r["api"] for r in scale["runs"]} == {"v2", "v3"}, scale
    for r in scale["runs"]:
        assert r["status"] == "ok", r
        assert r["programmed_s"] > 0 and r["burst_s"] > 0 and r["rss_bytes"] > 0
    assert doc["headline"]["ratios"]["host-gw"]["tcp1_vs_hostgw"] == pytest.approx(1.0)
    assert "| host-gw |" in (out / "results.md").read_text()
