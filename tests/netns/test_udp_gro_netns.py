"""UDP through the engine's userspace GRO: datagrams of one flow from one GRO batch are
written to the TUN as one GSO_UDP_L4 packet, and the receiving socket gets them back
whole and in order (iperf3 UDP counts loss and reordering), from a flannelette sender
and from a kernel VXLAN one."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.kernel_vxlan import KernelVxlan
from benchmarks.lab import Host, Lab
from tests.netns.test_engine_netns import MAC1, MAC2, start_engine, wait_stats

pytestmark = pytest.mark.netns("iperf3")


def _udp(lab: Lab, src: Host, dst: Host, rate: str = "100M") -> dict[str, float]:
    assert src.container_ns and dst.container_ns and dst.container_ip
    server = lab.popen(dst.container_ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = lab.run(src.container_ns, "iperf3", "-c", str(dst.container_ip), "-u", "-b",
                      rate, "-l", "1400", "-t", "3", "-J", timeout=30).stdout
    finally:
        lab.stop(server)
    end = json.loads(out)["end"]["sum"]
    return {"packets": float(end["packets"]), "lost": float(end["lost_packets"]),
            "percent": float(end["lost_percent"])}


def _hosts(lab: Lab) -> tuple[Host, Host]:
    lab.add_segment("A", "10.10.1.0/24")
    return lab.add_host("h1", "A", "10.244.1.0/24"), lab.add_host("h2", "A", "10.244.2.0/24")


def test_udp_between_engines_is_merged_and_arrives_whole(lab: Lab, tmp_path: Path) -> None:
    h1, h2 = _hosts(lab)
    s1, s2 = tmp_path / "h1.json", tmp_path / "h2.json"
    start_engine(lab, h1, MAC1, [(h2, MAC2)], s1)
    start_engine(lab, h2, MAC2, [(h1, MAC1)], s2)
    assert h1.container_ns and h2.container_ip
    assert lab.wait_ping(h1.container_ns, h2.container_ip)
    res = _udp(lab, h1, h2)
    assert res["packets"] > 1000 and res["percent"] < 5.0, res
    st = wait_stats(s2, lambda s: s.peers["10.244.1.0/24"].rx_packets >= res["packets"]
                    - res["lost"])
    assert st.drops["tun_write_failed"] == 0
    assert st.rx_gro_merged > 0 and st.rx_gso > 0  # GSO_UDP_L4 writes happened


def test_udp_from_a_kernel_vxlan_peer_is_merged_and_arrives_whole(lab: Lab,
                                                                  tmp_path: Path) -> None:
    h1, h2 = _hosts(lab)
    kv = KernelVxlan.create(h2.ns, "10.244.2.0/24", str(h2.ip))
    kv.add_peer("10.244.1.0/24", str(h1.ip), MAC1, static_neighbour=True)
    stats = tmp_path / "h1.json"
    start_engine(lab, h1, MAC1, [(h2, kv.mac)], stats)
    assert h2.container_ns and h1.container_ip
    assert lab.wait_ping(h2.container_ns, h1.container_ip)
    res = _udp(lab, h2, h1)
    assert res["packets"] > 1000 and res["percent"] < 5.0, res
    st = wait_stats(stats, lambda s: s.rx_gro_merged > 0)
    assert st.drops["tun_write_failed"] == 0
