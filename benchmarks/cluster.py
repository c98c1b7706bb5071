"""A flannelette cluster inside a namespace lab: one real etcd, agents as processes.

The demo, the benchmarks and the namespace tests share it::

    with Lab() as lab:
        lab.add_segment("A", "10.10.1.0/24")
        h1 = lab.add_host("h1", "A", "10.244.1.0/24")   # container subnet: written to
        with Cluster(lab) as cluster:                   # subnet.env, so the agent leases it
            cluster.start_etcd()
            cluster.set_config('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}', api=2)
            a1 = cluster.start_agent(h1)                # waits for /readyz
            cluster.status(a1)["node"]["subnet"]

etcd runs in the lab's core namespace on the first segment's gateway address, so
every host reaches it through its default route. Each agent runs in its host's
namespace with ``--iface eth0``, its own subnet.env and log file in the cluster's
work directory, and serves /status on 127.0.0.1:9480 inside that namespace.
:meth:`Cluster.close` stops the agents (SIGTERM, then SIGKILL), etcd, and removes
the work directory; the lab removes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.etcd import EtcdServer
from benchmarks.lab import Host, Lab, Segment

PREFIX = "/coreos.com/network"
HEALTHZ_PORT = 9480
ETCD_PORT = 2379  # inside the lab's core namespace every port is free
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FETCH = """
import json, sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        code, body = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read().decode()
except OSError as e:
    code, body = 0, str(e)
print(json.dumps({"code": code, "body": body}))
"""


class ClusterError(RuntimeError):
    """An agent did not come up, or answered something unexpected; the message has its log."""


@dataclass
class AgentProcess:
    """One `flannelette run` process in a host namespace."""

    host: Host
    proc: subprocess.Popen[bytes]
    log_path: str
    subnet_file: str
    healthz_port: int
    argv: tuple[str, ...]

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


class Cluster:
    """etcd + agents on a :class:`Lab`. Use as a context manager (or call close())."""

    def __init__(self, lab: Lab, *, segment: str | None = None, prefix: str = PREFIX) -> None:
        self.lab = lab
        self.segment = segment
        self.prefix = prefix
        self.etcd: EtcdServer | None = None
        self.agents: list[AgentProcess] = []
        self.workdir = tempfile.mkdtemp(prefix="flannelette-cluster-")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- etcd ------------------------------------------------------------------------------
    def start_etcd(self) -> EtcdServer:
        """A real etcd (v2 enabled) in the core namespace, on the segment's gateway.

        Calling it again after ``cluster.etcd.kill()`` restarts the same member with its
        data (an etcd outage and recovery)."""
        if self.etcd is None:
            self.etcd = EtcdServer(host=str(self._segment().gateway), netns=self.lab.core,
                                   port=ETCD_PORT)
        self.etcd.start()
        return self.etcd

    def _segment(self) -> Segment:
        if not self.lab.segments:
            raise ClusterError("add a segment to the lab before starting etcd")
        return self.lab.segments[self.segment] if self.segment else next(
            iter(self.lab.segments.values()))

    @property
    def endpoint(self) -> str:
        """etcd's client URL; known before etcd starts (agents may be started first)."""
        if self.etcd is not None:
            return self.etcd.endpoint
        return f"http://{self._segment().gateway}:{ETCD_PORT}"

    def set_config(self, config: str | Mapping[str, Any], api: int = 3) -> None:
        """Write ``<prefix>/config`` with etcdctl, as users do (api=2: `set`, api=3: `put`)."""
        if self.etcd is None:
            raise ClusterError("start_etcd() first")
        text = config if isinstance(config, str) else json.dumps(config)
        verb = "set" if api == 2 else "put"
        self.etcd.etcdctl(verb, f"{self.prefix}/config", text, api=api)

    def etcdctl(self, *args: str, api: int = 3, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        if self.etcd is None:
            raise ClusterError("start_etcd() first")
        return self.etcd.etcdctl(*args, api=api, check=check)

    # ---- agents ----------------------------------------------------------------------------
    def start_agent(self, host: Host | str, *flags: str, api: str = "auto",
                    env: Mapping[str, str] | None = None, wait: bool = True,
                    timeout: float = 40.0, healthz_port: int = HEALTHZ_PORT) -> AgentProcess:
        """Start `flannelette run` in ``host``'s namespace; with ``wait``, until /readyz is 200.

        Defaults: ``--etcd-endpoints <etcd> --etcd-api <api> --iface eth0 --subnet-file
        <workdir>/<host>.env --healthz-port 9480``; ``flags`` are appended (later wins).
        """
        h = self.lab.hosts[host] if isinstance(host, str) else host
        subnet_file = os.path.join(self.workdir, f"{h.name}.subnet.env")
        if h.subnet is not None and not os.path.exists(subnet_file):
            # flannel's second acquire rule: a free subnet from an existing subnet.env
            # is taken, so the agent leases the subnet of the lab's container.
            with open(subnet_file, "w") as f:
                f.write(f"FLANNEL_SUBNET={h.subnet.network_address + 1}/{h.subnet.prefixlen}\n")
        log_path = os.path.join(self.workdir, f"{h.name}.log")
        argv = (sys.executable, "-m", "control.cli", "run",
                "--etcd-endpoints", self.endpoint, "--etcd-prefix", self.prefix,
                "--etcd-api", api, "--iface", h.iface, "--subnet-file", subnet_file,
                "--healthz-port", str(healthz_port), *flags)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "ab") as log:
            proc = self.lab.popen(h.ns, *argv, stdout=log, stderr=subprocess.STDOUT,
                                  env=full_env, cwd=REPO)
        agent = AgentProcess(h, proc, log_path, subnet_file, healthz_port, argv)
        self.agents.append(agent)
        if wait:
            self.wait_ready(agent, timeout)
        return agent

    def fetch(self, agent: AgentProcess, path: str, timeout: float = 5.0
              ) -> tuple[int, str]:
        """GET ``path`` from the agent's health server, from inside its namespace."""
        url = f"http://127.0.0.1:{agent.healthz_port}{path}"
        res = self.lab.run(agent.host.ns, sys.executable, "-c", _FETCH, url, str(timeout),
                           check=False, timeout=timeout + 20)
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            return 0, res.stderr
        return int(doc["code"]), str(doc["body"])

    def status(self, agent: AgentProcess) -> dict[str, Any]:
        """The agent's /status document."""
        code, body = self.fetch(agent, "/status")
        if code != 200:
            raise ClusterError(f"/status of {agent.host.name}: {code} {body}\n{agent.log()}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def wait_ready(self, agent: AgentProcess, timeout: float = 40.0) -> dict[str, Any]:
        """Poll /readyz until 200; ClusterError (with the agent's log) if it exits or times out."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not agent.running:
                raise ClusterError(f"agent on {agent.host.name} exited with "
                                   f"{agent.proc.returncode}:\n{agent.log()}")
            code, body = self.fetch(agent, "/readyz", timeout=2.0)
            if code == 200:
                doc: dict[str, Any] = json.loads(body)
                return doc
            last = f"{code} {body}"
            time.sleep(0.3)
        raise ClusterError(f"agent on {agent.host.name} not ready after {timeout}s "
                           f"(last /readyz: {last}):\n{agent.log()}")

    def wait_peers(self, agent: AgentProcess, subnets: Sequence[str], timeout: float = 30.0
                   ) -> dict[str, Any]:
        """Poll /status until the agent lists exactly ``subnets`` as peers."""
        deadline = time.monotonic() + timeout
        want = sorted(subnets)
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.status(agent)
            if sorted(p["subnet"] for p in doc["peers"]) == want:
                return doc
            time.sleep(0.3)
        raise ClusterError(f"{agent.host.name} peers {[p['subnet'] for p in doc.get('peers', [])]}"
                           f" != {want} after {timeout}s:\n{agent.log()}")

    def wait_status(self, agent: AgentProcess, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 30.0, what: str = "condition") -> dict[str, Any]:
        """Poll /status until ``predicate(doc)`` holds; the document that satisfied it."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.status(agent)
            if predicate(doc):
                return doc
            time.sleep(0.3)
        raise ClusterError(f"{agent.host.name}: {what} not reached after {timeout}s "
                           f"(last /status: {json.dumps(doc)[:2000]}):\n{agent.log()}")

    def metrics(self, agent: AgentProcess) -> str:
        """The agent's /metrics text (Prometheus exposition)."""
        code, body = self.fetch(agent, "/metrics")
        if code != 200:
            raise ClusterError(f"/metrics of {agent.host.name}: {code} {body}")
        return body

    def stop_agent(self, agent: AgentProcess, timeout: float = 10.0) -> int | None:
        """SIGTERM (then SIGKILL) the agent; its exit code."""
        return self.lab.stop(agent.proc, timeout)

    def close(self) -> None:
        """Stop every agent and etcd; remove the work directory."""
        for agent in reversed(self.agents):
            with contextlib.suppress(Exception):
                self.stop_agent(agent)
        self.agents.clear()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
            self.etcd = None
        shutil.rmtree(self.workdir, ignore_errors=True)
