"""Live backend switch: the agents watch ``<prefix>/config`` and switch without a restart.

Three hosts as in test_backends_e2e (h1, h2 on segment A, h3 behind the router).
The config goes vxlan -> vxlan + DirectRouting -> host-gw -> vxlan while pings
run; each step checks the paths in /status, the kernel routes, the per-peer log
lines, and that the agents are the same processes. Losses are measured per
switch (sequence numbers of a 10 pps ping) and must stay inside the switch.
A second test feeds bad, refused and deleted configs and one more switch over
the v2 API. (The ConfigWatch methods are checked directly on a real etcd in
test_registry_etcd.py.)
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from benchmarks.cluster import AgentProcess
from benchmarks.lab import Host, Lab
from tests.netns.test_backends_e2e import (
    CONFIG_KEY,
    HOST_GW,
    NETWORK,
    TUN_ROUTE,
    VXLAN,
    VXLAN_DR,
    ThreeHosts,
    ping_ok,
    start_all,
    subnet,
    three_hosts_lab,
    tx_to,
    wait_for,
    wait_paths,
    wait_routes,
)

pytestmark = [pytest.mark.netns("ping"), pytest.mark.etcd("etcdctl")]


INTERVAL = 0.1  # ping interval while switching (10 packets per second)
COUNT = 80  # 8 s of pings per switch
MAX_LOST = 40  # at most 4 s without answers per switch (generous for a loaded 2-core box)


@pytest.fixture(scope="module")
def world() -> Iterator[ThreeHosts]:
    with three_hosts_lab() as w:
        yield w


@dataclass
class Pinger:
    """A bounded 10 pps ping from ``src``'s container to ``dst``'s, in the background."""

    lab: Lab
    src: Host
    dst: Host
    proc: subprocess.Popen[str]

    @classmethod
    def start(cls, lab: Lab, src: Host, dst: Host) -> Pinger:
        assert src.container_ns is not None and dst.container_ip is not None
        proc = lab.popen(src.container_ns, "ping", "-n", "-D", "-c", str(COUNT),
                         "-i", str(INTERVAL), "-W", "1", str(dst.container_ip),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return cls(lab, src, dst, proc)

    def lost(self) -> dict[int, float]:
        """Unanswered sequence numbers -> when they were sent (wall clock, estimated from
        the answered one before: ping sends every INTERVAL whether answers come or not)."""
        out, _ = self.proc.communicate(timeout=COUNT * INTERVAL + 30)
        replies = {int(m.group(2)): float(m.group(1)) for m in re.finditer(
            r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", out, re.M)}
        assert replies, out
        first = min(replies)
        lost = {}
        for seq in range(1, COUNT + 1):
            if seq in replies:
                continue
            base = max((s for s in replies if s < seq), default=first)
            lost[seq] = replies[base] + (seq - base) * INTERVAL
        return lost


def set_config(w: ThreeHosts, text: str, api: int) -> None:
    w.cluster.etcdctl("put" if api == 3 else "set", CONFIG_KEY, text, api=api)


def pids(w: ThreeHosts) -> dict[str, int]:
    for a in w.agents.values():
        assert a.running, a.log()[-3000:]
    return {name: a.proc.pid for name, a in w.agents.items()}


def switch(w: ThreeHosts, text: str, api: int, want: dict[str, dict[str, str]],
           pairs: list[tuple[Host, Host]]) -> dict[str, dict[int, float]]:
    """Write ``text`` while ``pairs`` ping; wait for the paths ``want`` (host -> peer -> path)
    on every host; return the lost pings per pair (sequence number -> send time)."""
    pingers = [Pinger.start(w.lab, a, b) for a, b in pairs]
    time.sleep(1.5)  # answered pings before the switch
    switched_at = time.time()
    set_config(w, text, api)
    for name, paths in want.items():
        wait_paths(w, w.lab.hosts[name], paths, timeout=40)
    converged = time.time() - switched_at
    lost = {f"{p.src.name}->{p.dst.name}": p.lost() for p in pingers}
    for pair, seqs in lost.items():
        window = [round(t - switched_at, 2) for t in seqs.values()]
        print(f"switch to {text}: {pair} lost {len(seqs)} of {COUNT} pings "
              f"(paths converged in {converged:.1f} s; losses at {window} s after the write)")
        assert len(seqs) <= MAX_LOST, (pair, window)
        # Only during the switch: nothing lost before the write (0.3 s of timing slack).
        assert all(t >= switched_at - 0.3 for t in seqs.values()), (pair, window)
    return lost


def logged(agent: AgentProcess, text: str) -> bool:
    return text in agent.log()


def lease_key(host: Host) -> str:
    return f"{CONFIG_KEY.rsplit('/', 1)[0]}/subnets/{subnet(host).replace('/', '-')}"


def lease_has(w: ThreeHosts, key: str, text: str) -> bool:
    return text in w.cluster.etcdctl("get", key, api=2).stdout


def path_lines(agent_log: str, host: Host) -> list[str]:
    return [line for line in agent_log.splitlines()
            if f"peer {subnet(host)}" in line and ": path " in line]


def test_live_switch_vxlan_dr_hostgw_vxlan_with_pings(world: ThreeHosts) -> None:
    w = world
    h1, h2, h3 = w.hosts
    set_config(w, VXLAN, api=3)
    start_all(w)
    wait_paths(w, h1, {"h2": "vxlan", "h3": "vxlan"})
    assert ping_ok(w.lab, h1, h3)
    before = pids(w)
    a1 = w.agent(h1)

    # vxlan -> vxlan + DirectRouting: h1 <-> h2 leave the tunnel, h3 stays in it.
    switch(w, VXLAN_DR, 3, {"h1": {"h2": "direct", "h3": "vxlan"},
                            "h2": {"h1": "direct", "h3": "vxlan"},
                            "h3": {"h1": "vxlan", "h2": "vxlan"}},
           [(h1, h2), (h1, h3), (h3, h2)])
    wait_routes(w.lab, h1, [TUN_ROUTE, f"{subnet(h2)} via {h2.ip} dev eth0"])
    tx2, tx3 = tx_to(w, h1, h2), tx_to(w, h1, h3)
    assert ping_ok(w.lab, h1, h2, count=5) and ping_ok(w.lab, h1, h3, count=5)
    assert tx_to(w, h1, h2) == tx2 and tx_to(w, h1, h3) - tx3 >= 5
    assert any("vxlan -> direct" in line for line in path_lines(a1.log(), h2))
    assert not any("-> direct" in line for line in path_lines(a1.log(), h3))
    assert "switching backend vxlan -> vxlan + DirectRouting in place" in a1.log()

    # -> host-gw: h2 stays direct, h3 becomes unreachable (with the warning).
    switch(w, HOST_GW, 3, {"h1": {"h2": "direct", "h3": "unreachable"},
                           "h2": {"h1": "direct", "h3": "unreachable"},
                           "h3": {"h1": "unreachable", "h2": "unreachable"}},
           [(h1, h2), (h2, h1)])
    wait_routes(w.lab, h1, [f"{subnet(h2)} via {h2.ip} dev eth0"])
    doc = w.cluster.status(a1)
    assert doc["node"]["backend"] == "host-gw" and doc["engine"] == {}
    assert any(subnet(h3) in x and "not on our L2 segment" in x for x in doc["warnings"])
    assert any("-> unreachable" in line for line in path_lines(a1.log(), h3))
    lease = w.cluster.etcdctl("get", f"{CONFIG_KEY.rsplit('/', 1)[0]}/subnets/10.7.1.0-24",
                              api=3).stdout
    assert '"BackendType":"host-gw"' in lease
    assert ping_ok(w.lab, h1, h2, count=5) and not ping_ok(w.lab, h1, h3, count=1)

    # -> back to vxlan: everything tunnelled again, h3 reachable again.
    switch(w, VXLAN, 3, {"h1": {"h2": "vxlan", "h3": "vxlan"},
                         "h2": {"h1": "vxlan", "h3": "vxlan"},
                         "h3": {"h1": "vxlan", "h2": "vxlan"}},
           [(h1, h2), (h2, h1)])
    wait_routes(w.lab, h1, [TUN_ROUTE])
    tx2 = tx_to(w, h1, h2)
    for src, dst in [(h1, h2), (h1, h3), (h2, h3), (h3, h1)]:
        assert w.lab.wait_ping(src.container_ns or "", dst.container_ip or "", deadline=15), (
            src.name, dst.name)
    assert tx_to(w, h1, h2) > tx2
    assert any("-> vxlan" in line for line in path_lines(a1.log(), h2)[-2:])
    assert '"BackendType":"vxlan"' in w.cluster.etcdctl(
        "get", f"{CONFIG_KEY.rsplit('/', 1)[0]}/subnets/10.7.1.0-24", api=3).stdout

    assert pids(w) == before  # no agent restarted
    for a in w.agents.values():
        assert "Traceback" not in a.log(), a.log()


def test_bad_refused_and_deleted_configs_keep_the_running_one_v2(world: ThreeHosts) -> None:
    """Over the v2 API (the seed's `etcdctl set`): bad configs change nothing, one error
    each; then nodes that started as host-gw (no engine, no VtepMAC yet) switch live to
    the seed's VxLAN + Directrouting, and to another VNI."""
    w = world
    h1, h2, h3 = w.hosts
    for a in list(w.agents.values()):
        w.cluster.stop_agent(a)
    w.agents.clear()
    w.cluster.etcdctl("del", CONFIG_KEY, api=3, check=False)
    set_config(w, HOST_GW, api=2)
    start_all(w)
    before = pids(w)
    a1 = w.agent(h1)
    bad = '{"Network":"10.7.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}'
    set_config(w, bad, api=2)
    wait_for(lambda: "SubnetLen must be less than /31" in a1.log(), 20, "rejection logged")
    set_config(w, '{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan"}}', api=2)
    wait_for(lambda: "Network 10.7.0.0/16 -> 10.8.0.0/16" in a1.log(), 20, "refusal logged")
    w.cluster.etcdctl("rm", CONFIG_KEY, api=2)
    for a in w.agents.values():
        wait_for(functools.partial(logged, a, "was deleted; keeping the running config"), 20,
                 f"deletion logged by {a.host.name}")
        errors = [line for line in a.log().splitlines() if " ERROR " in line]
        assert len(errors) == 2, errors  # exactly one line per bad config
        assert sum("SubnetLen must be less than /31" in e for e in errors) == 1
    assert "backend host-gw" in errors[0]
    doc = wait_paths(w, h1, {"h2": "direct", "h3": "unreachable"})
    assert doc["node"]["network"] == NETWORK and doc["node"]["backend"] == "host-gw"
    assert doc["node"]["vtep_mac"] is None and doc["engine"] == {}
    assert ping_ok(w.lab, h1, h2)
    # The seed's casing, set again after the rm: a live switch over v2 to vxlan (engines
    # start, VtepMACs are made and published).
    set_config(w, VXLAN_DR, api=2)
    for h in w.hosts:
        wait_for(functools.partial(lease_has, w, lease_key(h), '"VtepMAC"'), 20,
                 f"{h.name} publishes a VtepMAC")
    wait_paths(w, h1, {"h2": "direct", "h3": "vxlan"})
    wait_paths(w, h3, {"h1": "vxlan", "h2": "vxlan"})
    for src, dst in ((h1, h2), (h3, h1), (h2, h3)):
        assert w.lab.wait_ping(src.container_ns or "", dst.container_ip or "", deadline=15), (
            src.name, dst.name)
    # A new VNI: every engine is rebuilt in place and the leases carry the new VNI.
    set_config(w, VXLAN_DR.replace('"Directrouting":true', '"Directrouting":true,"VNI":2'),
               api=2)
    for h in w.hosts:
        wait_for(functools.partial(lease_has, w, lease_key(h), '"VNI":2'), 20,
                 f"{h.name} publishes VNI 2")
        assert "VNI 1 -> 2" in w.agent(h).log()
    wait_paths(w, h3, {"h1": "vxlan", "h2": "vxlan"})
    for src, dst in ((h1, h3), (h3, h2), (h1, h2)):
        assert w.lab.wait_ping(src.container_ns or "", dst.container_ip or "", deadline=15), (
            src.name, dst.name)
    wait_routes(w.lab, h3, [TUN_ROUTE.replace("flannel.1", "flannel.2")])
    assert pids(w) == before
    for a in w.agents.values():
        assert "Traceback" not in a.log(), a.log()

