"""Agents publish the flannelette capability in their vxlan lease the way flannel can
read it: VNI and VtepMAC first and unchanged, then an extra field flannel ignores."""

from __future__ import annotations

import json

import pytest

from benchmarks.cluster import Cluster
from benchmarks.lab import Lab
from control.lease import decode_attrs
from tests.netns.test_engine_netns import tcp_transfer

pytestmark = [pytest.mark.netns, pytest.mark.etcd("etcdctl")]


PREFIX = "/coreos.com/network"


@pytest.mark.parametrize("offload", ["off", "on"])
def test_agents_publish_csum_partial_next_to_flannels_fields(lab: Lab, offload: str) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "B", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config('{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}', api=3)
        a1 = cluster.start_agent(h1, "--engine-offload", offload)
        a2 = cluster.start_agent(h2, "--engine-offload", offload)
        cluster.wait_peers(a1, ["10.7.2.0/24"])
        cluster.wait_peers(a2, ["10.7.1.0/24"])
        out = cluster.etcdctl("get", "--prefix", f"{PREFIX}/subnets/").stdout.splitlines()
        values = [line for line in out if line.startswith("{")]
        assert len(values) == 2
        for text in values:
            doc = json.loads(text)
            data = doc["BackendData"]
            assert list(data) == ["VNI", "VtepMAC", "Flannelette"]  # flannel's order first
            assert data["VNI"] == 1 and data["Flannelette"] == {"CsumPartial": True}
            assert text.index('"BackendData":{"VNI":1,"VtepMAC":"') > 0
            assert decode_attrs(text).csum_partial is True
        # The tunnel carries traffic between the two flannelette agents, TCP intact.
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        assert h2.container_ns and h1.container_ip
        for src, dst, ip in ((h1.container_ns, h2.container_ns, h2.container_ip),
                             (h2.container_ns, h1.container_ns, h1.container_ip)):
            sent, received = tcp_transfer(lab, src, dst, str(ip), nbytes=2 << 20)
            assert sent == received and sent.startswith(str(2 << 20))
        if offload == "on":  # TSO splits towards a flannelette peer keep checksums partial
            assert cluster.status(a1)["engine"]["tx_csum_partial"] > 0
