"""`flannelette status` against real agents in the lab (table and JSON), against nothing,
and the agent's JSON log lines (--log-format json)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.cluster import REPO, AgentProcess, Cluster
from benchmarks.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.etcd("etcdctl")]

CONFIG = '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'


def status_cmd(lab: Lab, agent: AgentProcess, *args: str) -> tuple[int, str, str]:
    """Run `flannelette status` inside the agent's host namespace, as an operator would."""
    res = lab.run(agent.host.ns, "env", f"PYTHONPATH={REPO}", sys.executable, "-m",
                  "control.cli", "status", *args, check=False, timeout=60)
    return res.returncode, res.stdout, res.stderr


def test_status_table_and_json_against_running_agents(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    h3 = lab.add_host("h3", "B", "10.7.3.0/24")
    assert h1.container_ns and h3.container_ip and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(CONFIG, api=2)
        a1 = cluster.start_agent(h1, "--healthz-port", "9555", "--log-format", "json",
                                 healthz_port=9555)
        a2 = cluster.start_agent(h2)
        a3 = cluster.start_agent(h3)
        cluster.wait_peers(a1, ["10.7.2.0/24", "10.7.3.0/24"])
        for a in (a2, a3):
            cluster.wait_peers(a, [s for s in ("10.7.1.0/24", "10.7.2.0/24", "10.7.3.0/24")
                                   if s != str(a.host.subnet)])
        assert lab.wait_ping(h1.container_ns, h3.container_ip, deadline=20)
        assert lab.ping(h1.container_ns, h3.container_ip, count=5).returncode == 0
        assert lab.ping(h1.container_ns, h2.container_ip, count=2).returncode == 0

        code, out, err = status_cmd(lab, a1, "--healthz-ip", "127.0.0.1",
                                    "--healthz-port", "9555", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["node"]["subnet"] == "10.7.1.0/24"
        assert doc["node"]["public_ip"] == str(h1.ip)
        assert doc["node"]["backend"] == "vxlan" and doc["node"]["direct_routing"] is True
        assert doc["node"]["etcd_api"] == "v2" and doc["etcd"]["connected"] is True
        peers = {p["subnet"]: p for p in doc["peers"]}
        assert peers["10.7.2.0/24"]["path"] == "direct"
        assert peers["10.7.3.0/24"]["path"] == "vxlan"
        assert peers["10.7.3.0/24"]["tx_packets"] >= 5
        assert peers["10.7.2.0/24"]["tx_packets"] == 0  # the kernel routes direct peers

        code, out, err = status_cmd(lab, a1, "--healthz-port", "9555")
        assert code == 0, err
        lines = out.splitlines()
        assert "  subnet       10.7.1.0/24" in lines
        assert "  backend      vxlan + DirectRouting" in lines
        assert f"  public ip    {h1.ip} (eth0)" in lines
        assert "  etcd api     v2 (connected)" in lines
        assert any(line.startswith("  lease until  ") and "(in 24.0 h)" in line
                   for line in lines), out
        row3 = next(line.split() for line in lines if line.startswith("10.7.3.0/24"))
        assert row3[1] == str(h3.ip) and row3[3] == "vxlan" and int(row3[4]) >= 5, out
        row2 = next(line.split() for line in lines if line.startswith("10.7.2.0/24"))
        assert row2[3] == "direct" and row2[4] == "0", out
        assert "drops: none" in lines or "drops" in lines

        # Default flags of `flannelette status` find an agent on the default port.
        code, out, err = status_cmd(lab, a2)
        assert code == 0 and "  subnet       10.7.2.0/24" in out.splitlines(), err

        # --log-format json: every line of h1's agent is one JSON object, events included.
        records = [json.loads(line) for line in a1.log().splitlines() if line.strip()]
        assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
        msgs = [r["msg"] for r in records]
        assert any(m.startswith("lease acquired: 10.7.1.0/24") for m in msgs), msgs
        assert any(m.startswith("peer added: 10.7.3.0/24") for m in msgs), msgs
        assert any("10.7.2.0/24" in m and "-> direct" in m for m in msgs), msgs


def test_status_against_nothing_says_so(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A")
    res = lab.run(h1.ns, "env", f"PYTHONPATH={REPO}", sys.executable, "-m", "control.cli",
                  "status", "--healthz-port", "9480", "--timeout", "2", check=False,
                  timeout=60)
    assert res.returncode == 1
    assert res.stdout == ""
    assert ("flannelette status: no flannelette agent answers at http://127.0.0.1:9480/status"
            in res.stderr), res.stderr
    assert "is `flannelette run` running" in res.stderr and "Traceback" not in res.stderr
