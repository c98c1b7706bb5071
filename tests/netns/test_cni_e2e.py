"""Containers through CNI: `flannelette run` (vxlan) on two lab hosts with a real etcd, and
container namespaces attached by the plugin exactly as a runtime attaches them.

Each plugin call is what libcni does: exec ``<CNI_PATH>/<type>`` inside the host's
namespace with only CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH
(and PATH) in the environment and the plugin's config on stdin; a conflist runs
its plugins in order on ADD with each result as the next one's ``prevResult``,
in reverse on DEL. The CNI bin dir holds Debian's reference plugins
(containernetworking-plugins: bridge, host-local, portmap) and ``flannel``, a
symlink to the ``flannelette-cni`` console script. The lab's hosts are added
without its own "container", so the bridge plugin's default ``cni0`` is free.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cluster import REPO, AgentProcess, Cluster
from benchmarks.lab import Host, Lab

pytestmark = [pytest.mark.netns("iptables", "ping"), pytest.mark.etcd("etcdctl")]

VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
DEBIAN_CNI = "/usr/lib/cni"
REFERENCE_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
# flannel's Kubernetes manifest (kube-flannel.yml, cni-conf.json), unchanged.
KUBE_FLANNEL_CONFLIST: dict[str, Any] = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
s.settimeout(30)
for _ in range(20):
    try:
        conn, peer = s.accept()
    except OSError:
        break
    with conn:
        conn.sendall(sys.argv[2].encode())
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
    c.settimeout(2)
    print(c.recv(100).decode())
"""


# ---- a small container runtime (libcni's calling convention) ---------------------------------
@dataclass
class Attachment:
    """One container attached to a network: what a runtime remembers for CHECK and DEL."""

    host: Host
    netns: str
    cid: str
    plugins: list[dict[str, Any]]  # each plugin's config as executed (without prevResult)
    cni_version: str
    result: dict[str, Any]

    @property
    def address(self) -> ipaddress.IPv4Interface:
        ips = self.result["ips"]
        return ipaddress.IPv4Interface(ips[0]["address"])


@dataclass
class Runtime:
    """Runs CNI plugins in host namespaces; tracks containers to tear them down after a test."""

    lab: Lab
    bin_dir: Path
    work: Path
    containers: list[str] = field(default_factory=list)
    attached: list[Attachment] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def container(self, name: str) -> str:
        """A fresh container namespace (lo up, as a runtime's sandbox); the lab also knows it."""
        ns = f"fl{self.lab.tag}-{name}"
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
        self.lab.namespaces.append(ns)
        self.containers.append(ns)
        self.lab.ip(ns, "link", "set", "lo", "up")
        return ns

    def exec_plugin(self, host: Host, command: str, conf: dict[str, Any], cid: str,
                    netns: str, ifname: str = "eth0") -> subprocess.CompletedProcess[str]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": f"/var/run/netns/{netns}" if netns else "",
               "CNI_IFNAME": ifname, "CNI_PATH": str(self.bin_dir),
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        argv = ["ip", "netns", "exec", host.ns, "env", "-i",
                *(f"{k}={v}" for k, v in env.items()), str(self.bin_dir / conf["type"])]
        return subprocess.run(argv, input=json.dumps(conf), capture_output=True, text=True,
                              timeout=60, check=False)

    @staticmethod
    def plugin_conf(conflist: dict[str, Any], plugin: dict[str, Any],
                    runtime_config: dict[str, Any]) -> dict[str, Any]:
        """libcni's buildOneConfig: the list's name and version, capabilities -> runtimeConfig."""
        conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        caps = {k: runtime_config[k] for k, on in plugin.get("capabilities", {}).items()
                if on and k in runtime_config}
        if caps:
            conf["runtimeConfig"] = caps
        return conf

    def add(self, host: Host, conflist: dict[str, Any], netns: str, cid: str,
            runtime_config: dict[str, Any] | None = None) -> Attachment:
        """ADD every plugin in order, each given the previous result; the final result."""
        plugins = [self.plugin_conf(conflist, p, runtime_config or {})
                   for p in conflist["plugins"]]
        att = Attachment(host, netns, cid, plugins, conflist["cniVersion"], {})
        self.attached.append(att)  # a failed ADD is DELeted too, as runtimes do
        prev: dict[str, Any] | None = None
        for conf in plugins:
            res = self.exec_plugin(host, "ADD", {**conf, **({"prevResult": prev} if prev else {})},
                                   cid, netns)
            assert res.returncode == 0, f"ADD {conf['type']}: {res.stdout}\n{res.stderr}"
            prev = json.loads(res.stdout)
        assert prev is not None
        att.result = prev
        return att

    def check(self, att: Attachment) -> list[subprocess.CompletedProcess[str]]:
        """CHECK every plugin in order with the cached result as prevResult."""
        return [self.exec_plugin(att.host, "CHECK", {**conf, "prevResult": att.result},
                                 att.cid, att.netns) for conf in att.plugins]

    def delete(self, att: Attachment) -> None:
        """DEL in reverse order (prevResult from 0.4.0 on, as libcni)."""
        with_prev = att.cni_version not in ("0.1.0", "0.2.0", "0.3.0", "0.3.1") and att.result
        for conf in reversed(att.plugins):
            doc = {**conf, "prevResult": att.result} if with_prev else conf
            res = self.exec_plugin(att.host, "DEL", doc, att.cid, att.netns)
            assert res.returncode == 0, f"DEL {conf['type']}: {res.stdout}\n{res.stderr}"
        self.attached.remove(att)

    def popen(self, ns: str, *cmd: str) -> subprocess.Popen[Any]:
        proc = self.lab.popen(ns, *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """DEL what is still attached, stop our processes, delete our container namespaces."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                self.lab.stop(proc)
        for att in reversed(self.attached):
            for conf in reversed(att.plugins):
                with contextlib.suppress(Exception):
                    self.exec_plugin(att.host, "DEL", conf, att.cid, att.netns)
        self.attached.clear()
        for ns in self.containers:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
            with contextlib.suppress(ValueError):
                self.lab.namespaces.remove(ns)
        self.containers.clear()


# ---- the shared world: two hosts running `flannelette run` -----------------------------------
@dataclass
class World:
    lab: Lab
    cluster: Cluster
    h1: Host
    h2: Host
    agents: dict[str, AgentProcess]
    subnets: dict[str, ipaddress.IPv4Network]
    bin_dir: Path


def _cni_bin_dir(root: Path) -> Path:
    """A CNI bin dir as an operator sets one up: the reference plugins plus ``flannel``."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for plugin in REFERENCE_PLUGINS:
        (bin_dir / plugin).symlink_to(os.path.join(DEBIAN_CNI, plugin))
    script = Path(sys.executable).parent / "flannelette-cni"
    if script.exists():
        (bin_dir / "flannel").symlink_to(script)
    else:  # package not reinstalled since the entry point was added: same code, by module
        wrapper = bin_dir / "flannel"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" '
                           '-m control.cni "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cni")
    with Lab() as lab:
        lab.add_segment("A", "10.10.1.0/24")
        h1 = lab.add_host("h1", "A")  # no lab "container": cni0 is the bridge plugin's
        h2 = lab.add_host("h2", "A")
        with Cluster(lab) as cluster:
            cluster.start_etcd()
            cluster.set_config(VXLAN, api=3)
            agents = {h.name: cluster.start_agent(h, wait=False) for h in (h1, h2)}
            subnets = {}
            for h in (h1, h2):
                cluster.wait_ready(agents[h.name], 60)
                subnets[h.name] = ipaddress.IPv4Network(
                    cluster.status(agents[h.name])["node"]["subnet"])
            cluster.wait_peers(agents["h1"], [str(subnets["h2"])], 40)
            cluster.wait_peers(agents["h2"], [str(subnets["h1"])], 40)
            yield World(lab, cluster, h1, h2, agents, subnets, _cni_bin_dir(root))
            for agent in agents.values():
                assert "Traceback" not in agent.log(), agent.log()


@pytest.fixture
def runtime(world: World, tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(world.lab, world.bin_dir, tmp_path)
    try:
        yield rt
    finally:
        rt.close()


def flannel_conflist(world: World, rt: Runtime, host: Host, **delegate: Any) -> dict[str, Any]:
    """A one-plugin list: flannel with this test's own subnet.env, dataDir and host-local dir."""
    plugin: dict[str, Any] = {
        "type": "flannel", "subnetFile": world.agents[host.name].subnet_file,
        "dataDir": str(rt.work / f"flannel-{host.name}"),
        "ipam": {"dataDir": str(rt.work / f"ipam-{host.name}")}}
    if delegate:
        plugin["delegate"] = delegate
    return {"name": "flannelette-test", "cniVersion": "1.0.0", "plugins": [plugin]}


def links(lab: Lab, ns: str) -> list[str]:
    out = lab.ip(ns, "-o", "link", "show").stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def reserved_ips(rt: Runtime, host: Host, network: str = "flannelette-test") -> list[str]:
    """host-local's reservations: one file per address (plus its lock and cursor files)."""
    d = rt.work / f"ipam-{host.name}" / network
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.name != "lock" and not p.name.startswith("last_reserved_ip"))


def nat_rules(lab: Lab, ns: str) -> list[str]:
    return sorted(lab.run(ns, "iptables", "-t", "nat", "-S").stdout.splitlines())


def tcp_get(lab: Lab, ns: str, addr: str, port: int, attempts: int = 20) -> str:
    """Connect and read what the server says; bounded retries while the server starts."""
    last = ""
    for _ in range(attempts):
        res = lab.run(ns, sys.executable, "-c", CLIENT, addr, str(port), check=False,
                      timeout=15)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip()
        last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
        time.sleep(0.3)
    raise AssertionError(f"no answer from {addr}:{port} in {ns}: {last}")


# ---- the tests --------------------------------------------------------------------------------
def test_containers_on_two_hosts_reach_each_other(world: World, runtime: Runtime) -> None:
    lab = world.lab
    atts: dict[str, list[Attachment]] = {}
    for h in (world.h1, world.h2):
        conflist = flannel_conflist(world, runtime, h)
        atts[h.name] = [runtime.add(h, conflist, runtime.container(f"{h.name}c{i}"),
                                    f"{h.name}-ctr-{i}") for i in (1, 2)]
    for name, pair in atts.items():
        subnet = world.subnets[name]
        for att in pair:
            assert att.address.ip in subnet and att.address.network == subnet
            addrs = lab.ip(att.netns, "-o", "-4", "addr", "show", "dev", "eth0").stdout
            assert f"inet {att.address}" in addrs
            assert lab.ip(att.netns, "link", "show", "eth0").stdout.count("mtu 1450") == 1
            routes = lab.ip(att.netns, "route").stdout
            assert f"10.7.0.0/16 via {subnet.network_address + 1}" in routes
    # every container pings every container on the other host (and its neighbour)
    first = atts["h1"][0]
    assert lab.wait_ping(first.netns, atts["h2"][0].address.ip, deadline=20)
    for a in (*atts["h1"], *atts["h2"]):
        others = atts["h2"] if a.host is world.h1 else atts["h1"]
        neighbour = [b for b in atts[a.host.name] if b is not a]
        for b in (*others, *neighbour):
            res = lab.ping(a.netns, b.address.ip, count=3)
            assert res.returncode == 0, f"{a.netns} -> {b.address.ip}: {res.stdout}"
    peer = world.cluster.status(world.agents["h1"])["peers"][0]
    assert peer["path"] == "vxlan" and peer["tx_packets"] >= 6 and peer["rx_packets"] >= 6
    # CHECK (bridge and host-local compare prevResult with the real state)
    for pair in atts.values():
        for att in pair:
            for res in runtime.check(att):
                assert res.returncode == 0, f"CHECK {att.cid}: {res.stdout}\n{res.stderr}"
    # DEL removes the interface and releases the address
    for h in (world.h1, world.h2):
        assert len(reserved_ips(runtime, h)) == 2
        for att in list(atts[h.name]):
            runtime.delete(att)
            assert links(lab, att.netns) == ["lo"]
            assert str(att.address.ip) not in reserved_ips(runtime, h)
            assert not (runtime.work / f"flannel-{h.name}" / att.cid).exists()
            res = runtime.check(att)[0]  # nothing left to check
            assert res.returncode != 0 and json.loads(res.stdout)["code"] == 3
        assert reserved_ips(runtime, h) == []
        assert not any(n.startswith("veth") for n in links(lab, h.ns))
    assert lab.ping(first.netns, atts["h2"][0].address.ip, count=1).returncode != 0


def test_add_del_twenty_times_leaks_nothing(world: World, runtime: Runtime) -> None:
    lab, h = world.lab, world.h1
    conflist = flannel_conflist(world, runtime, h)
    ns = runtime.container("leak")
    att = runtime.add(h, conflist, ns, "leak-0")  # the first ADD creates cni0; then baseline
    runtime.delete(att)
    base_links, base_nat = links(lab, h.ns), nat_rules(lab, h.ns)
    seen = set()
    for i in range(1, 21):
        att = runtime.add(h, conflist, ns, f"leak-{i}")
        assert att.address.ip in world.subnets["h1"]
        seen.add(att.address.ip)
        assert reserved_ips(runtime, h) == [str(att.address.ip)]
        runtime.delete(att)
        assert links(lab, ns) == ["lo"], f"round {i}"
        assert reserved_ips(runtime, h) == [], f"round {i}"
    assert links(lab, h.ns) == base_links
    assert nat_rules(lab, h.ns) == base_nat  # the bridge's ipMasq chains went with each DEL
    assert list((runtime.work / "flannel-h1").iterdir()) == []
    assert len(seen) > 1  # host-local moved on through the range, and nothing piled up


def test_kubernetes_manifest_conflist_with_portmap(world: World, runtime: Runtime) -> None:
    """flannel's own kube-flannel.yml conflist as is; the test only points subnetFile,
    dataDir and host-local's dataDir at its own files instead of the node's."""
    lab, h1, h2 = world.lab, world.h1, world.h2
    conflist = json.loads(json.dumps(KUBE_FLANNEL_CONFLIST))
    conflist["plugins"][0].update({
        "subnetFile": world.agents["h1"].subnet_file, "dataDir": str(runtime.work / "fl"),
        "ipam": {"dataDir": str(runtime.work / "ipam")}})
    path = runtime.work / "10-flannel.conflist"  # what /etc/cni/net.d would hold
    path.write_text(json.dumps(conflist, indent=2))
    conflist = json.loads(path.read_text())
    ns = runtime.container("web")
    mapping = {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}
    att = runtime.add(h1, conflist, ns, "web-1", mapping)
    assert att.result["cniVersion"] == "0.3.1"
    gateway = world.subnets["h1"].network_address + 1
    assert f"default via {gateway}" in lab.ip(ns, "route").stdout  # isDefaultGateway
    assert "18080" in "\n".join(nat_rules(lab, h1.ns))
    runtime.popen(ns, sys.executable, "-c", SERVER, "8080", "hello-from-web")
    # through portmap's DNAT on h1's own address, from the other host
    assert tcp_get(lab, h2.ns, str(h1.ip), 18080) == "hello-from-web"
    # and straight to the container across the overlay, from a container on h2
    other = runtime.add(h2, flannel_conflist(world, runtime, h2), runtime.container("cli"),
                        "cli-1")
    assert tcp_get(lab, other.netns, str(att.address.ip), 8080) == "hello-from-web"
    runtime.delete(other)
    runtime.delete(att)
    assert "18080" not in "\n".join(nat_rules(lab, h1.ns))
    assert links(lab, ns) == ["lo"]
    assert list((runtime.work / "fl").iterdir()) == []


def test_before_the_agent_wrote_subnet_env_add_says_try_again(world: World,
                                                              runtime: Runtime) -> None:
    conflist = flannel_conflist(world, runtime, world.h1)
    missing = str(runtime.work / "not-yet" / "subnet.env")
    conflist["plugins"][0]["subnetFile"] = missing
    ns = runtime.container("early")
    conf = runtime.plugin_conf(conflist, conflist["plugins"][0], {})
    res = runtime.exec_plugin(world.h1, "ADD", conf, "early-1", ns)
    doc = json.loads(res.stdout)
    assert res.returncode == 1 and doc["code"] == 11 and missing in doc["msg"]
    assert links(world.lab, ns) == ["lo"]
    # DEL of a container that never got added succeeds, as the spec (and flannel) want
    res = runtime.exec_plugin(world.h1, "DEL", conf, "early-1", ns)
    assert res.returncode == 0 and res.stdout == ""
