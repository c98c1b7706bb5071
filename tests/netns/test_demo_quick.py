"""`flannelette demo` as a user runs it: a subprocess, its output, its exit code, and
nothing left behind (namespaces, processes, directories, state files)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from benchmarks.cluster import REPO
from benchmarks.demo import list_netns, pid_alive, state_path

pytestmark = [pytest.mark.netns("ping"), pytest.mark.etcd("etcdctl")]


def demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "control.cli", "demo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def tag_of(out: str) -> str:
    m = re.search(r"namespaces fl([0-9a-f]{6})-", out)
    assert m, out
    return m.group(1)


def reported_pids(out: str) -> set[int]:
    pids = {int(p) for p in re.findall(r"\bpid (\d+)", out)}
    pids |= {int(p) for p in re.findall(r"^  kill (\d+)", out, re.M)}
    m = re.search(r"stopped pids ([\d ]+);", out)
    if m:
        pids |= {int(p) for p in m.group(1).split()}
    return pids


def reported_dirs(out: str) -> list[str]:
    m = re.search(r"temporary directories: (.*)", out)
    return [d.strip() for d in m.group(1).split(",")] if m else []


def assert_nothing_left(out: str) -> None:
    tag = tag_of(out)
    assert [ns for ns in list_netns() if ns.startswith(f"fl{tag}-")] == [], out
    pids = reported_pids(out)
    assert pids, out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if pid_alive(p)] == [], out
    dirs = reported_dirs(out)
    assert dirs and all(d.startswith(tempfile.gettempdir()) for d in dirs), out
    assert [d for d in dirs if os.path.exists(d)] == [], out
    assert not os.path.exists(state_path(tag))


def test_demo_quick_runs_all_three_models_and_leaves_nothing() -> None:
    start = time.monotonic()
    res = demo("--quick")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for header in ("Model 1 of 3: host-gw", "Model 2 of 3: vxlan",
                   "Model 3 of 3: vxlan+DirectRouting", "Summary"):
        assert header in out, out
    # The seed's etcdctl v2 commands, with the 10.x Network said out loud.
    assert ("set /coreos.com/network/config "
            "'{\"Network\":\"10.7.0.0/16\",\"Backend\":{\"Type\":\"VxLAN\",\"Directrouting\":true}}'"
            in out), out
    assert "rm /coreos.com/network/config" in out and "the seed uses 172.7.0.0/16" in out
    # The agents switch live: started once, the same processes for all three models.
    assert out.count("[ok] starting an agent on h1, h2, h3") == 1, out
    assert out.count("switched without a restart") == 2, out
    summary = out[out.index("Summary"):]
    rows = {tuple(line.split()[:5]) for line in summary.splitlines()}
    assert ("host-gw", "h1c", "->", "h2c", "direct") in rows, summary
    assert ("host-gw", "h1c", "->", "h3c", "unreachable") in rows, summary
    assert ("vxlan", "h1c", "->", "h2c", "vxlan") in rows, summary
    assert ("vxlan+DirectRouting", "h1c", "->", "h2c", "direct") in rows, summary
    assert ("vxlan+DirectRouting", "h1c", "->", "h3c", "vxlan") in rows, summary
    # Measured, not printed from a table: every working pair has RTTs and a rate (a
    # lost ping on a loaded machine is reported, not fatal; none answering would be).
    assert len(re.findall(r"[123]/3, avg \d+\.\d+ ms", summary)) == 7, summary
    assert len(re.findall(r"\d+(\.\d+)? [MG]bit/s", summary)) == 5, summary
    assert "Traceback" not in out
    assert_nothing_left(out)
    print(f"demo --quick wall time {time.monotonic() - start:.1f} s")


def test_demo_failing_step_exits_nonzero_with_the_reason_and_cleans_up() -> None:
    """IP forwarding off on h2 (a real broken precondition): h1c cannot reach h2c."""
    res = demo("--quick", "--model", "host-gw", "--break-forwarding")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "FAILED: h1's container cannot ping h2's container" in out, out
    assert "ip_forward is 0" in out, out  # h2's agent says why, from its /status
    assert "Traceback" not in out
    assert_nothing_left(out)


@pytest.mark.parametrize(("sig", "code", "said"), [
    (signal.SIGTERM, 143, "terminated (SIGTERM): cleaning up"),
    (signal.SIGINT, 130, "interrupted (Ctrl-C): cleaning up")])
def test_demo_signal_mid_run_tears_down(sig: int, code: int, said: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "control.cli", "demo", "--quick"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:  # until the agents of the first model are up
            seen.append(line)
            if "[ok] starting an agent on h1, h2, h3" in line or time.monotonic() > deadline:
                break
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == code, out
    assert said in out, out
    assert_nothing_left(out)


def test_demo_restart_procedure_keep_and_cleanup() -> None:
    """The seed's procedure to the letter (agents stopped and started around the etcdctl
    commands), then --keep leaves a working lab that --cleanup removes."""
    res = demo("--quick", "--model", "host-gw", "--model", "vxlan", "--restart", "--keep")
    out = res.stdout + res.stderr
    tag = tag_of(out)
    try:
        assert res.returncode == 0, out
        assert f"flannelette demo --cleanup {tag}" in out, out
        assert "[ok] stopping the agents (the seed: supervisorctl stop flannel-21)" in out
        assert out.count("[ok] starting an agent on h1, h2, h3") == 2, out
        ours = [ns for ns in list_netns() if ns.startswith(f"fl{tag}-")]
        assert f"fl{tag}-h1c" in ours and f"fl{tag}-core" in ours
        # The printed command to enter the lab works: h1's container reaches h3's.
        cmd = next(line.split("#")[0].split() for line in out.splitlines()
                   if line.strip().startswith(f"ip netns exec fl{tag}-h1c ping"))
        assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
        agents = [int(p) for p in re.findall(r"kill (\d+)\s+# agent on h\d", out)]
        assert len(agents) == 3 and all(pid_alive(p) for p in agents), out
        assert os.path.exists(state_path(tag))
    finally:
        clean = demo("--cleanup", tag, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"removed lab {tag}" in clean.stdout
    assert_nothing_left(out)
