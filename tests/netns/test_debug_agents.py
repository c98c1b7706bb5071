"""`flannelette explain` (and a capture) against real agents in a DirectRouting lab.

h1 and h2 share segment A (direct route), h3 sits behind the router (VXLAN); etcd
in the core. Explain must say direct, vxlan and no-route where the kernel and
the engine really do that, and a capture on an agent must see the tunnelled ping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.debug_lab import fl, fl_popen, wait_taps
from tests.netns.test_backends_e2e import VXLAN_DR, ThreeHosts, restart_with, three_hosts_lab

pytestmark = [pytest.mark.netns("ping"), pytest.mark.etcd("etcdctl")]


@pytest.fixture(scope="module")
def world() -> Iterator[ThreeHosts]:
    with three_hosts_lab() as w:
        restart_with(w, VXLAN_DR)
        yield w


def _explain(w: ThreeHosts, *args: str) -> dict[str, Any]:
    res = fl(w.lab, w.h1, "explain", "--json", *args, check=True)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_explain_direct_vxlan_and_no_route(world: ThreeHosts) -> None:
    w = world
    c1, c2, c3 = (str(h.container_ip) for h in w.hosts)
    direct = _explain(w, "--src", c1, "--dst", c2, "--proto", "tcp", "--dport", "80")
    assert direct["verdict"] == "direct" and direct["peer"]["public_ip"] == str(w.h2.ip)
    route = next(s for s in direct["steps"] if s["step"] == "kernel route")
    assert route["gateway"] == str(w.h2.ip) and route["dev"] == "eth0"
    vx = _explain(w, "--src", c1, "--dst", c3)
    assert vx["verdict"] == "vxlan" and vx["peer"]["subnet"] == str(w.h3.subnet)
    assert vx["peer"]["lease_expires_in_s"] > 0 and vx["peer"]["flannelette"] is True
    outer = next(s for s in vx["steps"] if s["step"] == "outer headers")
    assert (outer["outer_src"], outer["outer_dst"], outer["udp_port"]) == (
        str(w.h1.ip), str(w.h3.ip), 8472)
    none = _explain(w, "--src", c1, "--dst", "10.7.99.5")
    assert (none["verdict"], none["reason"]) == ("no-route", "no_route")
    local = _explain(w, "--src", c1, "--dst", str(w.h1.container_ip))
    assert local["verdict"] == "local"
    rx = _explain(w, "--outer-src", str(w.h3.ip), "--src", c3, "--dst", c1)
    assert rx["verdict"] == "vxlan" and rx["direction"] == "rx"
    stranger = _explain(w, "--outer-src", str(w.h2.ip), "--src", c2, "--dst", c1)
    assert (stranger["verdict"], stranger["reason"]) == ("dropped", "unknown_peer")
    text = fl(w.lab, w.h1, "explain", "--src", c1, "--dst", c3, check=True).stdout
    assert text.splitlines()[-1].startswith(f"verdict: vxlan  peer {w.h3.subnet}")


def test_capture_on_an_agent_and_its_metrics(world: ThreeHosts) -> None:
    w = world
    proc = fl_popen(w.lab, w.h1, "trace", "--json", "-c", "2", "icmp")
    wait_taps(w.lab, w.h1, 1)
    assert w.h1.container_ns is not None
    assert w.lab.ping(w.h1.container_ns, str(w.h3.container_ip), count=1).returncode == 0
    out, err = proc.communicate(timeout=30)
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["direction"] for d in docs] == ["tx", "rx"], out + err
    assert docs[0]["peer"] == str(w.h3.subnet) and docs[0]["outer_dst"] == str(w.h3.ip)
    assert docs[1]["inner_summary"].startswith(f"ICMP {w.h3.container_ip} > "
                                               f"{w.h1.container_ip} echo-reply")
    metrics = w.lab.run(w.h1.ns, "python3", "-c", "import urllib.request; print(urllib.request"
                        ".urlopen('http://127.0.0.1:9480/metrics').read().decode())").stdout
    assert "flannelette_taps_active 0.0" in metrics
    assert "flannelette_tap_records_total 2.0" in metrics
    assert "flannelette_tap_records_lost_total 0.0" in metrics
    assert "# TYPE flannelette_drops_total counter" in metrics
