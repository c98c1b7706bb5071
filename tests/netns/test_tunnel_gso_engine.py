"""The engine's tunnel-GSO path end to end: 20 MB TCP, sha256 checked at both ends.

The sender writes each TCP super-packet once, wrapped in outer headers, to its
``fltx.1`` TAP and the kernel segments and forwards it (dataplane/txtap.py).
Receivers: another flannelette engine, and a kernel VXLAN device set up as
flannel sets it up; both directions; and the fallback with the feature forced
off. Skips with the kernel's reason where Linux < 6.17 lacks the feature.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernel_vxlan import KernelVxlan
from benchmarks.lab import Host, Lab
from tests.netns.test_engine_netns import (
    MAC1,
    MAC2,
    ROOT,
    start_engine,
    tcp_transfer,
    wait_stats,
)

pytestmark = pytest.mark.netns
NBYTES = 20 << 20
PEER1, PEER2 = "10.244.1.0/24", "10.244.2.0/24"


def _kernel_supports(lab: Lab, host: Host) -> str | None:
    """None if a TAP takes the tunnel-GSO offload bits in ``host``, else the reason."""
    probe = ("from dataplane.txtap import TunnelTx\n"
             "from dataplane.errors import DeviceError\n"
             "try:\n    TunnelTx.open('fltxprobe').close()\n"
             "except DeviceError as e:\n    print(e)\n")
    out = lab.run(host.ns, sys.executable, "-c", probe, check=False)
    return out.stdout.strip() or out.stderr.strip() or None


def _hosts(lab: Lab) -> tuple[Host, Host]:
    lab.add_segment("A", "10.10.1.0/24")
    return lab.add_host("h1", "A", PEER1), lab.add_host("h2", "A", PEER2)


def _both_ways(lab: Lab, h1: Host, h2: Host) -> None:
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns, str(h2.container_ip),
                                  nbytes=NBYTES)
    assert sent == received and sent.startswith(str(NBYTES)), "h1 -> h2"
    sent, received = tcp_transfer(lab, h2.container_ns, h1.container_ns, str(h1.container_ip),
                                  nbytes=NBYTES, seed=2)
    assert sent == received and sent.startswith(str(NBYTES)), "h2 -> h1"


def test_tunnel_gso_between_two_engines(lab: Lab, tmp_path: Path) -> None:
    h1, h2 = _hosts(lab)
    reason = _kernel_supports(lab, h1)
    if reason:
        pytest.skip(f"no tunnel GSO here: {reason}")
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    args = ("--offload", "on", "--tunnel-gso", "on")
    start_engine(lab, h1, MAC1, [(h2, MAC2)], s1, *args)
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2, *args)
    _both_ways(lab, h1, h2)
    for path in (s1, s2):
        st = wait_stats(path, lambda s: s.tunnel_gso_writes > 0)
        assert st.tx_path == "tunnel-gso" and st.tunnel_gso.startswith("on")
        assert st.tunnel_gso_writes > 0 and st.tunnel_gso_segments > st.tunnel_gso_writes
        assert st.drops["tun_write_failed"] == 0 and st.drops["send_failed"] == 0


def test_tunnel_gso_to_and_from_a_kernel_vxlan_peer(lab: Lab, tmp_path: Path) -> None:
    h1, h2 = _hosts(lab)
    reason = _kernel_supports(lab, h1)
    if reason:
        pytest.skip(f"no tunnel GSO here: {reason}")
    kv = KernelVxlan.create(h2.ns, PEER2, str(h2.ip))
    kv.add_peer(PEER1, str(h1.ip), MAC1, static_neighbour=True)
    stats = tmp_path / "h1.json"
    start_engine(lab, h1, MAC1, [(h2, kv.mac)], stats, "--offload", "on", "--tunnel-gso", "on")
    _both_ways(lab, h1, h2)
    st = wait_stats(stats, lambda s: min(s.peers[PEER2].tx_bytes, s.peers[PEER2].rx_bytes)
                    > NBYTES)
    assert st.tunnel_gso_writes > 0
    assert st.peers[PEER2].tx_bytes > NBYTES and st.peers[PEER2].rx_bytes > NBYTES
    link = lab.ip(h2.ns, "-s", "link", "show", "dev", kv.name).stdout
    assert "errors" in link  # the kernel device counted what it took (no rx errors below)
    rx_errors = int(link.split("RX:")[1].splitlines()[1].split()[2])
    assert rx_errors == 0


def test_tunnel_gso_forced_off_uses_the_userspace_split(lab: Lab, tmp_path: Path) -> None:
    h1, h2 = _hosts(lab)
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    args = ("--offload", "on", "--tunnel-gso", "off")
    start_engine(lab, h1, MAC1, [(h2, MAC2)], s1, *args)
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2, *args)
    _both_ways(lab, h1, h2)
    st = wait_stats(s1, lambda s: s.tso_splits > 0)
    assert st.tx_path == "tso-split+udp-gso" and st.tunnel_gso == "off"
    assert st.tunnel_gso_writes == 0 and st.tso_splits > 0
    assert "fltx" not in lab.ip(h1.ns, "link", "show").stdout


def test_tunnel_gso_on_without_ip_forward_fails_with_one_clear_line(lab: Lab,
                                                                    tmp_path: Path) -> None:
    h1, h2 = _hosts(lab)
    lab.sysctl(h1.ns, "net.ipv4.ip_forward", "0")
    assert h1.subnet is not None
    from dataplane.standalone import command
    proc = lab.popen(h1.ns, *command(str(h1.subnet), str(h1.ip), MAC1,
                                     [(PEER2, str(h2.ip), MAC2)], "--offload", "on",
                                     "--tunnel-gso", "on"), cwd=ROOT,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "ip_forward" in err and "Traceback" not in err
    assert "fltx" not in lab.ip(h1.ns, "link", "show").stdout
