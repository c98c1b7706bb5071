"""Two engines that know each other as flannelette peers: TCP segments cross the tunnel
with partial checksums (pseudo-header sum only) and the receiver completes them.

The sender counts what it sent partial, the receiver what it handed to the kernel
as NEEDS_CSUM/GSO; the SHA-256 of 4 MB each way proves nothing was lost or bent.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lab import Host, Lab
from dataplane.standalone import FLANNELETTE, command, read_stats
from tests.netns.test_engine_netns import MAC1, MAC2, ROOT, tcp_transfer, wait_stats

pytestmark = pytest.mark.netns


def _start(lab: Lab, me: Host, mac: str, peer: Host, peer_mac: str, stats: Path,
           offload: str) -> subprocess.Popen[Any]:
    assert me.subnet is not None
    spec = (str(peer.subnet), str(peer.ip), peer_mac, FLANNELETTE)
    proc = lab.popen(me.ns, *command(str(me.subnet), str(me.ip), mac, [spec],
                                     "--offload", offload, "--stats-file", str(stats),
                                     "--stats-interval", "0.2"),
                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while read_stats(str(stats)) is None:
        if proc.poll() is not None:
            raise AssertionError(f"engine in {me.name} exited: {proc.communicate()[1]}")
        assert time.monotonic() < end, "engine did not start within 30 s"
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("offload2", ["on", "off"], ids=["both-offload", "plain-receiver"])
def test_partial_checksums_between_flannelette_peers(lab: Lab, tmp_path: Path,
                                                     offload2: str) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    h2 = lab.add_host("h2", "A", "10.244.2.0/24")
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    _start(lab, h1, MAC1, h2, MAC2, s1, "on")
    _start(lab, h2, MAC2, h1, MAC1, s2, offload2)
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns, str(h2.container_ip))
    assert sent == received and sent.startswith(str(4 << 20))
    sent, received = tcp_transfer(lab, h2.container_ns, h1.container_ns, str(h1.container_ip),
                                  seed=2)
    assert sent == received and sent.startswith(str(4 << 20))
    st1 = wait_stats(s1, lambda s: s.tx_csum_partial > 0
                     and s.peers["10.244.2.0/24"].rx_bytes > 4 << 20)
    assert st1.tx_csum_partial > 0  # the super-packets were split without full checksums
    st2 = wait_stats(s2, lambda s: s.peers["10.244.1.0/24"].rx_bytes > 4 << 20)
    assert st2.rx_csum_partial + st2.rx_gso > 0
    if offload2 == "off":  # a plain engine reads segmented packets: nothing to leave partial
        assert st2.tx_csum_partial == 0
    for st in (st1, st2):
        assert st.drops["tun_write_failed"] == 0 and st.drops["bad_ipv4_header"] == 0
