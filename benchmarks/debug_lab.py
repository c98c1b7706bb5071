"""A lab for the debug commands: two `flannelette engine` hosts and a stranger.

Shared by tests/netns/test_debug_*.py and by the worked diagnoses of
docs/debugging.md: ``python -m benchmarks.debug_lab`` (root) builds the lab once
per scenario, breaks one thing (UDP 8472 blocked, a stale VtepMAC, an MTU too
large, a kernel VXLAN peer's partial checksums, spoofed and unknown sources),
runs the commands a user would and prints each with its real output; every
namespace and process goes away at the end, also on errors and Ctrl-C.

Topology: h1 (10.10.1.1, subnet 10.244.1.0/24) and h2 (10.10.1.2, 10.244.2.0/24)
on segment A, each with a container (.2); h3 (10.10.1.3) on the same segment
runs no engine and is no peer.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.lab import Host, Lab
from dataplane.standalone import command, read_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAC1, MAC2 = "0a:11:22:33:44:01", "0a:11:22:33:44:02"


def fl(lab: Lab, host: Host, *args: str, timeout: float = 60.0, check: bool = False
       ) -> subprocess.CompletedProcess[str]:
    """Run `flannelette ARGS` in ``host``'s namespace (against its engine on 127.0.0.1:9480)."""
    return lab.run(host.ns, "env", f"PYTHONPATH={REPO}", sys.executable, "-m", "control.cli",
                   *args, timeout=timeout, check=check)


def fl_popen(lab: Lab, host: Host, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return lab.popen(host.ns, "env", f"PYTHONPATH={REPO}", sys.executable, "-m",
                     "control.cli", *args, **kwargs)


def status(lab: Lab, host: Host) -> dict[str, Any]:
    res = fl(lab, host, "status", "--json", check=True)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def wait_taps(lab: Lab, host: Host, n: int, deadline: float = 15.0) -> None:
    """Until ``host``'s engine has ``n`` captures/traces attached."""
    end = time.monotonic() + deadline
    while int(status(lab, host)["engine"].get("taps_active", -1)) != n:
        if time.monotonic() > end:
            raise AssertionError(f"{host.name}: taps_active never became {n}")
        time.sleep(0.1)


def start_engine(lab: Lab, host: Host, mac: str, peers: Sequence[tuple[Host, str]],
                 stats: Path, *extra: str) -> subprocess.Popen[Any]:
    """`flannelette engine` in ``host`` with static peers; returns once it serves /status."""
    assert host.subnet is not None
    specs = [(str(p.subnet), str(p.ip), m) for p, m in peers]
    proc = lab.popen(host.ns, *command(str(host.subnet), str(host.ip), mac, specs,
                                       "--stats-file", str(stats), "--stats-interval", "0.2",
                                       *extra), cwd=REPO, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while read_stats(str(stats)) is None or fl(lab, host, "status").returncode != 0:
        if proc.poll() is not None:
            raise AssertionError(f"engine in {host.name} exited: {proc.communicate()[1]}")
        if time.monotonic() > end:
            raise AssertionError(f"engine in {host.name} did not start within 30 s")
        time.sleep(0.1)
    return proc


@contextlib.contextmanager
def engines_lab(extra1: Sequence[str] = (), extra2: Sequence[str] = (), mac2: str = MAC2,
                peer_mac2: str = MAC2) -> Iterator[tuple[Lab, Host, Host, Host, Path]]:
    """h1 and h2 running engines that know each other (h1 knows h2 by ``peer_mac2``), h3."""
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="fl-debug-") as tmp:
        lab.add_segment("A", "10.10.1.0/24")
        h1 = lab.add_host("h1", "A", "10.244.1.0/24")
        h2 = lab.add_host("h2", "A", "10.244.2.0/24")
        h3 = lab.add_host("h3", "A")
        work = Path(tmp)
        start_engine(lab, h1, MAC1, [(h2, peer_mac2)], work / "h1.json", *extra1)
        start_engine(lab, h2, mac2, [(h1, MAC1)], work / "h2.json", *extra2)
        yield lab, h1, h2, h3, work


# ---- the worked diagnoses of docs/debugging.md ------------------------------------------------
def _show(lab: Lab, host: Host, *args: str, lines: int = 12) -> str:
    """Run a command and print it the way the doc shows it (output cut at ``lines``)."""
    res = fl(lab, host, *args)
    out = (res.stdout + res.stderr).rstrip("\n").splitlines()
    more = [f"... ({len(out) - lines} more lines)"] if len(out) > lines else []
    text = "\n".join([f"{host.name}# flannelette {' '.join(args)}", *out[:lines], *more])
    print(text + "\n", flush=True)
    return res.stdout


def _shell(lab: Lab, host: Host, text: str, *cmd: str) -> None:
    res = lab.run(host.ns, *cmd, check=False)
    print(f"{host.name}# {text}\n{(res.stdout + res.stderr).strip()}\n", flush=True)


def _trace_during(lab: Lab, host: Host, pinger: Host, dst: str, *args: str,
                  count: int = 2, size: int = 56) -> None:
    proc = fl_popen(lab, host, "trace", *args)
    wait_taps(lab, host, 1)
    assert pinger.container_ns is not None
    lab.run(pinger.container_ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1",
            "-s", str(size), dst, check=False)
    time.sleep(0.5)
    lab.stop(proc)
    out, err = proc.communicate(timeout=10)
    print(f"{host.name}# flannelette trace {' '.join(args)}   (while "
          f"{pinger.name}'s container pings {dst} -s {size})\n{(out + err).strip() or '(nothing)'}"
          "\n", flush=True)


def blocked_8472() -> None:
    print("## UDP 8472 blocked on the path\n")
    with engines_lab() as (lab, h1, h2, _, _):
        lab.run(h2.ns, "nft", "add table inet lab; add chain inet lab in { type filter hook "
                "input priority 0; }; add rule inet lab in udp dport 8472 drop")
        assert h2.container_ip is not None
        _trace_during(lab, h1, h1, str(h2.container_ip), "-c", "4")
        _trace_during(lab, h2, h1, str(h2.container_ip), "--duration", "2")
        _show(lab, h1, "inject", "--to", "10.244.2.0/24")
        _show(lab, h2, "drops")
        _show(lab, h1, "explain", "--src", "10.244.1.2", "--dst", str(h2.container_ip))


def stale_mac() -> None:
    print("## A peer with a stale VtepMAC\n")
    with engines_lab(mac2="0a:11:22:33:44:99") as (lab, h1, h2, _, _):
        assert h2.container_ip is not None and h1.container_ns is not None
        lab.ping(h1.container_ns, h2.container_ip, count=2)
        _show(lab, h2, "drops", "--reason", "not_for_our_mac", lines=3)
        _show(lab, h2, "explain", "--outer-src", "10.10.1.1", "--src", "10.244.1.2", "--dst",
              str(h2.container_ip), "--inner-dst-mac", MAC2)


def mtu_too_large() -> None:
    print("## MTU too large\n")
    with engines_lab(extra1=("--mtu", "1500")) as (lab, h1, h2, _, _):
        assert h2.container_ip is not None
        _trace_during(lab, h1, h1, str(h2.container_ip), "-c", "2", count=1, size=1460)
        _show(lab, h2, "drops", "--reason", "oversize", lines=3)
        _show(lab, h2, "explain", "--outer-src", "10.10.1.1", "--src", "10.244.1.2", "--dst",
              str(h2.container_ip), "--size", "1488")


def spoofed_and_unknown() -> None:
    print("## A spoofed or unknown source\n")
    with engines_lab() as (lab, h1, h2, _h3, _):
        _show(lab, h2, "inject", "--to", "10.244.1.0/24", "--malformed", "spoofed-inner")
        _show(lab, h1, "inject", "--outer-src", "10.10.1.3", "--src", "10.244.2.9")
        _show(lab, h1, "drops")
        _show(lab, h1, "explain", "--outer-src", "10.10.1.3", "--src", "10.244.2.9", "--dst",
              "10.244.1.2")
        _shell(lab, h1, "curl -s 127.0.0.1:9480/metrics | grep ^flannelette_drops_total",
               "sh", "-c", f"PYTHONPATH={REPO} {sys.executable} -c \"import urllib.request;"
               "print(urllib.request.urlopen('http://127.0.0.1:9480/metrics').read().decode())\""
               " | grep ^flannelette_drops_total")


def kernel_partial() -> None:
    print("## A kernel VXLAN peer's partial checksums\n")
    from benchmarks.kernel_vxlan import KernelVxlan

    with Lab() as lab, tempfile.TemporaryDirectory(prefix="fl-debug-") as tmp:
        lab.add_segment("A", "10.10.1.0/24")
        h1 = lab.add_host("h1", "A", "10.244.1.0/24")
        h2 = lab.add_host("h2", "A", "10.244.2.0/24")
        assert h2.subnet is not None and h1.subnet is not None
        kv = KernelVxlan.create(h2.ns, str(h2.subnet), str(h2.ip))
        kv.add_peer(str(h1.subnet), str(h1.ip), MAC1)
        start_engine(lab, h1, MAC1, [(h2, kv.mac)], Path(tmp) / "h1.json")
        assert h1.container_ip is not None and h2.container_ns and h1.container_ns
        proc = fl_popen(lab, h1, "trace", "-c", "3", "--direction", "rx", "tcp")
        wait_taps(lab, h1, 1)
        server = lab.popen(h1.container_ns, sys.executable, "-c", _SERVER, str(h1.container_ip))
        time.sleep(0.5)
        lab.run(h2.container_ns, sys.executable, "-c", _CLIENT, str(h1.container_ip),
                check=False, timeout=20)
        out, err = proc.communicate(timeout=20)
        lab.stop(server)
        print(f"h1# flannelette trace -c 3 --direction rx tcp   (while h2's container "
              f"opens a TCP connection to {h1.container_ip})\n{(out + err).strip()}\n")


_SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(15)
c, _ = s.accept(); c.recv(100); c.close()
"""
_CLIENT = """
import socket, sys, time
for _ in range(50):
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=2); break
    except OSError:
        time.sleep(0.2)
c.sendall(b"hello" * 100); c.close()
"""


def _iperf(lab: Lab, client: Host, server: Host, seconds: int) -> float:
    assert client.container_ns and server.container_ns and server.container_ip
    srv = lab.popen(server.container_ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        res = lab.run(client.container_ns, "iperf3", "-c", str(server.container_ip), "-t",
                      str(seconds), "-J", timeout=seconds + 30)
        doc = json.loads(res.stdout)
        return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        lab.stop(srv)


def capture_cost(seconds: int = 3, rounds: int = 2) -> None:
    """One TCP stream h1 -> h2 (iperf3), without and with a full capture on h1's engine."""
    print("## What a full capture costs\n")
    with engines_lab() as (lab, h1, h2, _, _):
        assert h1.container_ns and h2.container_ip
        lab.wait_ping(h1.container_ns, h2.container_ip)
        for i in range(rounds):
            off = _iperf(lab, h1, h2, seconds)
            figures = [f"capture off {off:.2f} Gbit/s"]
            for what, args in (("full capture, both sides, -w /dev/null", ()),
                               ("tap on, filter matching nothing", ("host", "10.99.9.9"))):
                cap = fl_popen(lab, h1, "capture", "-w", "/dev/null", "--side", "both", *args)
                wait_taps(lab, h1, 1)
                on = _iperf(lab, h1, h2, seconds)
                lab.stop(cap)
                _, err = cap.communicate(timeout=10)
                summary = err.strip().removeprefix("flannelette capture: ")
                figures.append(f"{what} {on:.2f} Gbit/s ({summary})")
            print(f"round {i + 1}: " + "; ".join(figures), flush=True)


SCENARIOS = {"blocked": blocked_8472, "stale-mac": stale_mac, "mtu": mtu_too_large,
             "spoofed": spoofed_and_unknown, "kernel-partial": kernel_partial,
             "capture-cost": capture_cost}


def main(argv: Sequence[str] = ()) -> int:
    names = list(argv) or list(SCENARIOS)
    for name in names:
        SCENARIOS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
