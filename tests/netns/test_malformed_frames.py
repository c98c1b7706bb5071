"""Malformed datagrams at the engine's UDP port are counted by reason; forwarding goes on.

The frames are the unit tests' drop-reason table (tests/unit/test_wire.py), sent
for real from inside the lab: from the peer h2 (a known PublicIP) and, for the
unknown-peer case, from h3, which is no peer. Then a few hundred random
datagrams, and traffic between the containers must still flow.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from benchmarks.lab import Host, Lab
from dataplane.wire import BROADCAST_MAC, ETH_P_ARP, RX_REASONS
from tests.netns.test_engine_netns import MAC1, MAC2, start_engine, tcp_transfer, wait_stats
from tests.unit.test_wire import ARP_CASES, RX_CASES, frame

pytestmark = pytest.mark.netns


_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for hexframe in sys.stdin.read().split():
    s.sendto(bytes.fromhex(hexframe[1:]), (sys.argv[2], 8472))
"""


def _send(lab: Lab, src: Host, dst: Host, frames: list[bytes]) -> None:
    """Send ``frames`` as UDP datagrams from ``src``'s address to ``dst``:8472, once each."""
    proc = lab.popen(src.ns, sys.executable, "-c", _SENDER, str(src.ip), str(dst.ip),
                     stdin=-1, text=True)
    proc.communicate("\n".join(f"x{f.hex()}" for f in frames), timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("offload", ["off", "on"])
def test_every_rx_drop_reason_is_counted_and_forwarding_continues(lab: Lab, tmp_path: Path,
                                                                 offload: str) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    h2 = lab.add_host("h2", "A", "10.244.2.0/24")
    h3 = lab.add_host("h3", "A")
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    engine = start_engine(lab, h1, MAC1, [(h2, MAC2)], s1, "--offload", offload)
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2, "--offload", offload)
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    assert lab.wait_ping(h2.container_ns, h1.container_ip)

    from_peer = [data for _, data, known, _ in RX_CASES if known]
    from_stranger = [data for _, data, known, _ in RX_CASES if not known]
    arp = [frame(body, dst=BROADCAST_MAC, ethertype=ETH_P_ARP) for _, body, _ in ARP_CASES]
    _send(lab, h2, h1, from_peer + arp)
    _send(lab, h3, h1, from_stranger)
    names = {r.value for r in RX_REASONS}
    stats = wait_stats(s1, lambda s: all(s.drops[n] >= 1 for n in names))
    missing = sorted(n for n in names if stats.drops[n] < 1)
    assert not missing, f"not counted: {missing}"
    assert stats.arp_replies >= 2  # the two valid requests of ARP_CASES
    assert stats.drops["unknown_peer"] >= len(from_stranger)

    rng = random.Random(7)
    junk = [b""] + [rng.randbytes(rng.randrange(0, 1400)) for _ in range(300)]
    junk += [b"\x08\x00\x00\x00\x00\x00\x01\x00" + j for j in junk[:100]]
    before = stats.total_drops
    _send(lab, h2, h1, junk)
    stats = wait_stats(s1, lambda s: s.total_drops >= before + len(junk))
    assert stats.total_drops >= before + len(junk)
    assert engine.poll() is None

    assert lab.ping(h2.container_ns, h1.container_ip).returncode == 0
    assert lab.ping(h1.container_ns, h2.container_ip).returncode == 0
    sent, received = tcp_transfer(lab, h2.container_ns, h1.container_ns, str(h1.container_ip),
                                  nbytes=1 << 20)
    assert sent == received
