"""Least privilege: the agent as user nobody with CAP_NET_ADMIN only (setpriv).

One host's agent runs as uid/gid 65534, no supplementary groups, CAP_NET_ADMIN as
its only capability (inheritable, ambient, bounding set; no_new_privs), with its
subnet.env in a directory that user owns (what systemd's RuntimeDirectory= gives,
docs/operations.md); the other host's agent runs as root. The unprivileged one must
acquire its lease, bring up its TUN, write subnet.env and carry a ping both ways.

/dev/net/tun must be openable by the service user: Debian's udev makes it 0666
(creating a device still needs CAP_NET_ADMIN); some images ship it 0600 root. The
test leaves the host's node alone and, in the agent's own mount namespace, binds
over it a node of the same device that is root:nogroup 0660, as a udev rule for
the service's group would make it.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile

import pytest

from benchmarks.cluster import HEALTHZ_PORT, REPO, AgentProcess, Cluster
from benchmarks.lab import Host, Lab

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
NOBODY = 65534
CAP_NET_ADMIN = 12


def start_unprivileged(cluster: Cluster, h: Host, *flags: str) -> AgentProcess:
    """`flannelette run` in ``h``'s namespace as nobody with CAP_NET_ADMIN only."""
    assert h.subnet is not None
    os.chmod(cluster.workdir, 0o711)  # nobody may pass through, not list
    run_dir = tempfile.mkdtemp(prefix="run-flannel-", dir=cluster.workdir)
    os.chown(run_dir, NOBODY, NOBODY)
    subnet_file = os.path.join(run_dir, "subnet.env")
    with open(subnet_file, "w") as f:  # as the lab's other agents: lease the container's
        f.write(f"FLANNEL_SUBNET={h.subnet.network_address + 1}/{h.subnet.prefixlen}\n")
    os.chown(subnet_file, NOBODY, NOBODY)
    tun_node = os.path.join(cluster.workdir, "tun")
    if not os.path.exists(tun_node):
        os.mknod(tun_node, 0o660 | stat.S_IFCHR, os.makedev(10, 200))
        os.chown(tun_node, 0, NOBODY)
        os.chmod(tun_node, 0o660)
    log_path = os.path.join(cluster.workdir, f"{h.name}.log")
    # unshare -m and sh's exec keep the pid: the agent's is the Popen's.
    bind = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /dev/net/tun && exec "$@"', tun_node)
    argv = (*bind, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin", "--no-new-privs",
            sys.executable, "-m", "control.cli", "run",
            "--etcd-endpoints", cluster.endpoint, "--iface", h.iface,
            "--subnet-file", subnet_file, "--healthz-port", str(HEALTHZ_PORT), *flags)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "HOME": "/nonexistent"}
    with open(log_path, "ab") as log:
        proc = cluster.lab.popen(h.ns, *argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=REPO)
    agent = AgentProcess(h, proc, log_path, subnet_file, HEALTHZ_PORT, argv)
    cluster.agents.append(agent)  # the cluster stops it on close
    cluster.wait_ready(agent)
    return agent


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def test_agent_as_nobody_with_cap_net_admin_only_carries_traffic(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        cluster.set_config(VXLAN)
        a1 = start_unprivileged(cluster, h1)
        a2 = cluster.start_agent(h2)

        st = proc_status(a1.proc.pid)  # setpriv execs: the pid is the agent's
        with open(f"/proc/{a1.proc.pid}/cmdline") as f:
            assert "control.cli" in f.read()
        assert st["Uid"].split() == [str(NOBODY)] * 4 and st["Gid"].split() == [str(NOBODY)] * 4
        assert st["Groups"].strip() == ""
        only = 1 << CAP_NET_ADMIN
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(st[field], 16) == only, (field, st[field])
        assert st["NoNewPrivs"].strip() == "1"

        doc = cluster.wait_peers(a1, ["10.7.2.0/24"])
        cluster.wait_peers(a2, ["10.7.1.0/24"])
        assert doc["node"]["subnet"] == "10.7.1.0/24" and doc["node"]["backend"] == "vxlan"
        link = lab.run(h1.ns, "ip", "-d", "link", "show", "flannel.1").stdout
        assert "tun" in link and "mtu 1450" in link and "UP" in link, link
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20), a1.log()
        assert lab.ping(h2.container_ns, h1.container_ip, count=5).returncode == 0
        with open(a1.subnet_file) as f:
            assert "FLANNEL_SUBNET=10.7.1.1/24\n" in f.read()
        assert os.stat(a1.subnet_file).st_uid == NOBODY
        peer = cluster.status(a1)["peers"][0]
        assert peer["tx_packets"] >= 5 and peer["rx_packets"] >= 5

        log = a1.log()
        assert "Traceback" not in log, log
        assert not re.search(r"(?i)permission denied|operation not permitted", log), log
        assert cluster.stop_agent(a1) == 0, a1.log()
