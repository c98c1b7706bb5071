"""Interop with the Linux kernel: h1 runs the userspace engine, h2 a flannel-style
kernel VXLAN device (benchmarks.kernel_vxlan). Offloads keep their defaults on
both sides, so the kernel sends partial inner checksums and unsegmented ~64 KB
datagrams; ping alone proves little, the TCP transfers in both directions count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kernel_vxlan import KernelVxlan
from benchmarks.lab import Host, Lab
from tests.netns.test_engine_netns import (
    MAC1,
    offload_args,
    start_engine,
    tcp_transfer,
    wait_stats,
)

pytestmark = pytest.mark.netns


def _setup(lab: Lab, tmp_path: Path, static_neighbour: bool, offload: str = "off"
           ) -> tuple[Host, Host, KernelVxlan, Path]:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    h2 = lab.add_host("h2", "A", "10.244.2.0/24")
    kv = KernelVxlan.create(h2.ns, "10.244.2.0/24", str(h2.ip))
    kv.add_peer("10.244.1.0/24", str(h1.ip), MAC1, static_neighbour=static_neighbour)
    stats = tmp_path / "h1.json"
    start_engine(lab, h1, MAC1, [(h2, kv.mac)], stats, *offload_args(offload))
    return h1, h2, kv, stats


def _ping_and_tcp_both_ways(lab: Lab, h1: Host, h2: Host) -> None:
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    assert lab.wait_ping(h2.container_ns, h1.container_ip)
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    sent, received = tcp_transfer(lab, h2.container_ns, h1.container_ns, str(h1.container_ip))
    assert sent == received and sent.startswith(str(4 << 20)), "kernel -> engine"
    sent, received = tcp_transfer(lab, h1.container_ns, h2.container_ns, str(h2.container_ip),
                                  seed=2)
    assert sent == received and sent.startswith(str(4 << 20)), "engine -> kernel"


@pytest.mark.parametrize("offload", ["off", "on", "plain"])
def test_engine_and_kernel_vxlan_static_neighbour(lab: Lab, tmp_path: Path, offload: str
                                                  ) -> None:
    h1, h2, kv, stats = _setup(lab, tmp_path, static_neighbour=True, offload=offload)
    assert kv.mtu == 1450 and kv.name == "flannel.1"
    _ping_and_tcp_both_ways(lab, h1, h2)
    s = wait_stats(stats, lambda s: min(s.peers["10.244.2.0/24"].rx_bytes,
                                        s.peers["10.244.2.0/24"].tx_bytes) > 4 << 20)
    assert s.peers["10.244.2.0/24"].rx_bytes > 4 << 20
    assert s.peers["10.244.2.0/24"].tx_bytes > 4 << 20
    # The kernel's partial checksums were handed back to the kernel as NEEDS_CSUM/GSO.
    assert s.rx_csum_partial + s.rx_gso > 0
    assert s.drops["tun_write_failed"] == 0
    assert s.tx_csum_partial == 0  # a kernel peer always gets full checksums


@pytest.mark.parametrize("offload", ["off", "on"])
def test_engine_answers_kernel_arp_over_the_tunnel(lab: Lab, tmp_path: Path, offload: str
                                                   ) -> None:
    h1, h2, kv, stats = _setup(lab, tmp_path, static_neighbour=False, offload=offload)
    _ping_and_tcp_both_ways(lab, h1, h2)
    s = wait_stats(stats, lambda s: s.arp_replies >= 1)
    assert s.arp_replies >= 1
    neigh = lab.ip(h2.ns, "neigh", "show", "dev", kv.name).stdout
    assert "10.244.1.0" in neigh and MAC1 in neigh.lower()


def test_kernel_remove_peer_stops_traffic(lab: Lab, tmp_path: Path) -> None:
    h1, h2, kv, _ = _setup(lab, tmp_path, static_neighbour=True)
    assert h2.container_ns and h1.container_ip
    assert lab.wait_ping(h2.container_ns, h1.container_ip)
    kv.remove_peer("10.244.1.0/24", str(h1.ip), MAC1)
    assert lab.ping(h2.container_ns, h1.container_ip, count=1).returncode != 0
    kv.add_peer("10.244.1.0/24", str(h1.ip), MAC1)
    assert lab.wait_ping(h2.container_ns, h1.container_ip)
