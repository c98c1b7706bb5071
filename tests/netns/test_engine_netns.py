"""Two hosts, each running the userspace engine (`flannelette engine`) with static peers.

Container-to-container ping both ways, a few MB over TCP with the SHA-256
compared at the far end, ICMP host-unreachable for a destination without a
peer, on uvloop and on plain asyncio, and with the offload mode on. The helpers
here are reused by the interop and malformed-frame tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lab import Host, Lab
from dataplane.standalone import command, read_stats
from dataplane.stats import EngineStats

pytestmark = pytest.mark.netns("ping")


MAC1, MAC2 = "0a:11:22:33:44:01", "0a:11:22:33:44:02"  # tests/unit/test_wire.py's OWN/PEER
ROOT = str(Path(__file__).resolve().parents[2])

_SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

_CLIENT = """
import hashlib, random, socket, sys, time
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
end = time.monotonic() + 20
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        if time.monotonic() > end:
            raise
        time.sleep(0.2)
c.settimeout(30); c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_transfer(lab: Lab, src_ns: str, dst_ns: str, dst_ip: str, nbytes: int = 4 << 20,
                 port: int = 5555, seed: int = 1) -> tuple[str, str]:
    """Send ``nbytes`` from ``src_ns`` to ``dst_ip`` in ``dst_ns``; return (sent, received)."""
    server = lab.popen(dst_ns, sys.executable, "-c", _SERVER, dst_ip, str(port),
                       stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        sent = lab.run(src_ns, sys.executable, "-c", _CLIENT, dst_ip, str(port), str(seed),
                       str(nbytes), timeout=90).stdout.strip()
        received = server.communicate(timeout=60)[0].strip()
    finally:
        lab.stop(server)
    return sent, received


def start_engine(lab: Lab, host: Host, mac: str, peers: list[tuple[Host, str]],
                 stats: Path, *extra: str) -> subprocess.Popen[Any]:
    """Run `flannelette engine` in ``host``; wait until it has written its first stats."""
    assert host.subnet is not None
    peer_args = [(str(p.subnet), str(p.ip), m) for p, m in peers]
    proc = lab.popen(host.ns, *command(str(host.subnet), str(host.ip), mac, peer_args,
                                       "--stats-file", str(stats), "--stats-interval", "0.2",
                                       *extra), cwd=ROOT,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while read_stats(str(stats)) is None:
        if proc.poll() is not None:
            raise AssertionError(f"engine in {host.name} exited: {proc.communicate()[1]}")
        assert time.monotonic() < end, "engine did not start within 30 s"
        time.sleep(0.1)
    return proc


def wait_stats(path: Path, ok: Callable[[EngineStats], bool], deadline: float = 20.0
               ) -> EngineStats:
    """Poll the stats file until ``ok`` holds; return the last snapshot either way."""
    end = time.monotonic() + deadline
    while True:
        stats = read_stats(str(path))
        if stats is not None and (ok(stats) or time.monotonic() > end):
            return stats
        assert time.monotonic() < end + 5, "no stats file"
        time.sleep(0.1)


def offload_args(mode: str) -> list[str]:
    """Engine flags for a mode: on, off (default: UDP GSO out, GRO in) or plain (neither:
    one datagram per system call, the path kernels without UDP GSO/GRO take)."""
    if mode == "plain":
        return ["--offload", "off", "--rx-gro", "off", "--tx-gso", "off"]
    return ["--offload", mode]


@pytest.fixture
def engines(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest
            ) -> tuple[Lab, Host, Host, Path, Path]:
    loop, offload = getattr(request, "param", ("uvloop", "off"))
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    h2 = lab.add_host("h2", "A", "10.244.2.0/24")
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    off1, off2 = ("on", "off") if offload == "mixed" else (offload, offload)
    start_engine(lab, h1, MAC1, [(h2, MAC2)], s1, "--loop", loop, *offload_args(off1))
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2, "--loop", loop, *offload_args(off2))
    return lab, h1, h2, s1, s2


@pytest.mark.parametrize("engines", [("uvloop", "off"), ("asyncio", "off"), ("uvloop", "on"),
                                     ("asyncio", "mixed"), ("uvloop", "plain")], indirect=True,
                         ids=["uvloop", "asyncio", "uvloop-offload", "offload-with-plain-peer",
                              "per-datagram"])
def test_two_engines_ping_and_tcp_both_ways(engines: tuple[Lab, Host, Host, Path, Path]
                                            ) -> None:
    lab, h1, h2, s1, s2 = engines
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    assert lab.ping(h2.container_ns, h1.container_ip).returncode == 0
    sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns, str(h2.container_ip))
    assert sent == received and sent.startswith(str(4 << 20))
    sent, received = tcp_transfer(lab, h2.container_ns, h1.container_ns, str(h1.container_ip),
                                  seed=2)
    assert sent == received
    st1 = wait_stats(s1, lambda s: min(s.peers["10.244.2.0/24"].rx_bytes,
                                       s.peers["10.244.2.0/24"].tx_bytes) > 4 << 20)
    peer = st1.peers["10.244.2.0/24"]
    assert peer.tx_bytes > 4 << 20 and peer.rx_bytes > 4 << 20
    assert st1.tun_packets > 0 and st1.udp_packets > 0 and st1.tun_max_batch >= 1
    st2 = wait_stats(s2, lambda s: s.peers["10.244.1.0/24"].rx_packets > 0)
    assert st2.peers["10.244.1.0/24"].tx_packets > 0


def test_no_peer_gets_icmp_host_unreachable(engines: tuple[Lab, Host, Host, Path, Path]
                                            ) -> None:
    lab, h1, h2, s1, _ = engines
    assert h1.container_ns and h2.container_ip
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    # The control plane would route the whole Network into the TUN; do that for one subnet.
    lab.ip(h1.ns, "route", "add", "10.244.99.0/24", "dev", "flannel.1")
    out = lab.ping(h1.container_ns, "10.244.99.2", count=2).stdout
    assert lab.ping(h1.container_ns, "10.244.99.2", count=1).returncode != 0
    stats = wait_stats(s1, lambda s: s.icmp_unreachable >= 1)
    assert stats.drops["no_route"] >= 1 and stats.icmp_unreachable >= 1
    full = lab.run(h1.container_ns, "ping", "-n", "-c", "1", "-W", "2", "10.244.99.2",
                   check=False).stdout
    assert "Destination Host Unreachable" in full, out + full
    assert lab.ping(h1.container_ns, h2.container_ip).returncode == 0


def test_engine_exits_cleanly_and_removes_its_device(
        engines: tuple[Lab, Host, Host, Path, Path]) -> None:
    lab, h1, _, s1, _ = engines
    proc = next(p for p in lab.procs
                if isinstance(p.args, list) and p.args[3] == h1.ns and "--subnet" in p.args)
    assert lab.stop(proc) == 0
    links = lab.ip(h1.ns, "link", "show").stdout
    assert "flannel.1" not in links
    assert read_stats(str(s1)) is not None


def test_engine_that_cannot_bind_says_so_and_leaves_no_device(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    res = lab.run(h1.ns, *command("10.244.1.0/24", "10.10.1.99", MAC1, []), check=False,
                  timeout=60)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "cannot bind UDP 10.10.1.99:8472" in res.stderr
    assert "flannel.1" not in lab.ip(h1.ns, "link", "show").stdout
