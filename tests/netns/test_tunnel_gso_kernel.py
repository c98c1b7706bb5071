"""Tunnel GSO end to end: one TAP write on h1, ordinary VXLAN datagrams into h2's kernel flannel.1.

The fact the engine would build on (issue 12 item 2, benchmarks/tunnel_gso_probe.py):
a VXLAN-wrapped TCP super-packet written once to a TAP with the 24-byte
``virtio_net_hdr_v1_hash_tunnel`` is forwarded by h1's stack to the underlay and
segmented by the kernel; each datagram must equal the segment we would have cut
(scapy-built, full checksums), reach h2's kernel VXLAN peer set up as flannel
does, and pass h2's container TCP checksum check. h1's eth0 is made to segment
in software with software checksums: over veth a GSO packet otherwise crosses
whole and partial checksums are trusted, so nothing would be checked.
Skips, with the reason, on a kernel without the feature (the fallback detection).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks import tunnel_gso_probe as probe
from benchmarks.lab import Lab

pytestmark = pytest.mark.netns


@pytest.fixture
def setup(lab: Lab) -> Iterator[probe.Setup]:
    support = probe.detect_support(lab.core)
    if not support.usable:
        pytest.skip(f"no tunnel GSO on kernel {support.kernel}: {support.reason()}")
    s = probe.build_setup(lab)
    try:
        yield s
    finally:
        s.tap.close()


def test_support_detection_facts(lab: Lab) -> None:
    support = probe.detect_support(lab.core)
    if not support.usable:
        pytest.skip(f"no tunnel GSO on kernel {support.kernel}: {support.reason()}")
    assert support.vnet_hdr_24 and support.offload_tunnel == 0 and support.tap_write_ok
    # The tunnel bits alone are refused: a plain TSO bit must come with them.
    assert support.offload_tunnel_alone != 0
    # An IFF_TUN device cannot take it: the kernel wants outer_th_offset >= 14 + 20.
    assert support.tun_write_errno != 0


@pytest.mark.parametrize("udp_csum", [False, True], ids=["udp-csum-0", "udp-csum-offload"])
@pytest.mark.parametrize("last", [0, 333], ids=["mss-multiple", "short-tail"])
def test_kernel_segments_match_ours_and_reach_kernel_vxlan(setup: probe.Setup, udp_csum: bool,
                                                           last: int) -> None:
    probe.force_software_segmentation(setup.lab, setup.h1.ns)
    res = probe.check_write(setup, 20, last, udp_csum=udp_csum)
    n = 20 + (1 if last else 0)
    assert res.segments_expected == n
    assert res.captured == n, res
    assert res.matching == n, res.first_mismatch
    assert res.flannel_rx == n
    assert res.container_tcp_in == n
    assert res.tcp_csum_errors == 0 and res.udp_csum_errors == 0


def test_a_wrong_inner_checksum_is_caught_so_the_check_is_live(setup: probe.Setup) -> None:
    probe.force_software_segmentation(setup.lab, setup.h1.ns)
    res = probe.check_write(setup, 5, 10, udp_csum=False, bad_csum=True)
    assert res.flannel_rx == 6 and res.tcp_csum_errors == 6


def test_default_offloads_the_super_packet_crosses_veth_whole(setup: probe.Setup) -> None:
    """As the kernel's own VXLAN does over veth: one GSO datagram, trusted by h2."""
    res = probe.check_write(setup, 4, 100, udp_csum=False)
    assert res.captured == 1 and res.flannel_rx == 1 and res.container_tcp_in == 1
    assert res.tcp_csum_errors == 0


def test_forwarding_needs_accept_local(setup: probe.Setup) -> None:
    """The outer source is h1's own address: without accept_local the stack drops it."""
    lab, tap = setup.lab, setup.tap
    lab.sysctl(setup.h1.ns, f"net.ipv4.conf.{tap.name}.accept_local", "0")
    res = probe.check_write(setup, 3, 0, udp_csum=False)
    assert res.flannel_rx == 0 and res.captured == 0
    lab.sysctl(setup.h1.ns, f"net.ipv4.conf.{tap.name}.accept_local", "1")
    assert probe.check_write(setup, 3, 0, udp_csum=False).flannel_rx == 1


def test_strict_rp_filter_drops_loose_passes(setup: probe.Setup) -> None:
    """rp_filter=1 on `all` drops it; 2 (loose, systemd's default) passes: the TAP has an addr."""
    lab, ns = setup.lab, setup.h1.ns
    try:
        lab.sysctl(ns, "net.ipv4.conf.all.rp_filter", "1")
        assert probe.check_write(setup, 3, 0, udp_csum=False).flannel_rx == 0
        lab.sysctl(ns, "net.ipv4.conf.all.rp_filter", "2")
        assert probe.check_write(setup, 3, 0, udp_csum=False).flannel_rx == 1
    finally:
        lab.sysctl(ns, "net.ipv4.conf.all.rp_filter", "0")
