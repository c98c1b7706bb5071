"""The lab itself: hosts on one segment talk directly, across segments via the core."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks.etcd import EtcdServer
from benchmarks.lab import Lab

pytestmark = pytest.mark.netns("ping")


def test_lab_builds_and_tears_down(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    h2 = lab.add_host("h2", "A", "10.244.2.0/24")
    h3 = lab.add_host("h3", "B", "10.244.3.0/24")
    assert lab.ping(h1.ns, h2.ip).returncode == 0
    assert lab.ping(h1.ns, h3.ip).returncode == 0
    assert h1.container_ns is not None and h1.bridge_ip is not None
    assert lab.ping(h1.container_ns, h1.bridge_ip).returncode == 0
    # Same segment: the kernel route has no gateway; other segment: via the core.
    same = lab.run(h1.ns, "ip", "route", "get", str(h2.ip)).stdout
    other = lab.run(h1.ns, "ip", "route", "get", str(h3.ip)).stdout
    assert " via " not in same and " via 10.10.1.254" in other
    names = list(lab.namespaces)
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_etcd_in_lab_namespace_reachable_from_hosts(lab: Lab) -> None:
    seg = lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A")
    server = EtcdServer(host=str(seg.gateway), netns=lab.core)
    try:
        server.start()
        server.etcdctl("set", "/coreos.com/network/config", '{"Network":"10.244.0.0/16"}', api=2)
        out = lab.run(h1.ns, "env", "ETCDCTL_API=2", "etcdctl", "--endpoints",
                      server.endpoint, "get", "/coreos.com/network/config").stdout
        assert "10.244.0.0/16" in out
    finally:
        server.stop()

