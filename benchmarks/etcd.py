"""A real, throwaway etcd server (Debian's etcd 3.4) for tests, the demo and benchmarks.

Started with ``--enable-v2=true`` so both of flannel's APIs are served, on a
free port, with a temporary data directory that is removed on stop. It runs
either on 127.0.0.1 in the current namespace or inside a lab namespace on that
namespace's addresses (so agents inside the lab can reach it).

:class:`EtcdCluster` runs several members as one cluster (``--initial-cluster``,
distinct client and peer ports, one temporary directory for all their data),
for failover tests: a member can be killed and started again with its data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field


class EtcdError(RuntimeError):
    """etcd could not be started or did not become healthy."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdServer:
    """One etcd member. ``host`` is the address it serves on (inside ``netns`` if set)."""

    host: str = "127.0.0.1"
    netns: str | None = None
    port: int = 0
    peer_port: int = 0
    data_dir: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    name: str = ""  # member name; default fl-<port>
    initial_cluster: str = ""  # name=peer-url,...; default: this member alone
    cluster_token: str = ""  # --initial-cluster-token (members of one cluster share it)
    _owned_dir: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def start(self, timeout: float = 20.0, wait: bool = True) -> EtcdServer:
        """Start etcd and wait until it answers /health; raise EtcdError if it does not.

        ``wait=False`` returns once the process runs (the first members of a new
        cluster cannot be healthy before a quorum of them is up)."""
        if shutil.which("etcd") is None:
            raise EtcdError("etcd is not installed (Debian package etcd-server)")
        if not self.data_dir:
            self.data_dir = tempfile.mkdtemp(prefix="flannelette-etcd-")
            self._owned_dir = True
        # Inside a fresh namespace every port is free; on the host ask the kernel.
        if not self.port:
            self.port = free_port(self.host) if self.netns is None else 2379
        if not self.peer_port:
            self.peer_port = free_port(self.host) if self.netns is None else 2380
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        name = self.name or f"fl-{self.port}"
        cluster = self.initial_cluster or f"{name}={self.peer_url}"
        argv = [
            *self._prefix(), "etcd", "--name", name,
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", cluster,
            *(["--initial-cluster-token", self.cluster_token] if self.cluster_token else []),
            "--enable-v2=true", "--log-level", "warn", "--logger", "zap",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait:
            return self
        return self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> EtcdServer:
        """Wait until the member answers /health; EtcdError (and stopped) if it does not."""
        if self.proc is None:
            raise EtcdError("etcd is not running")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise EtcdError(f"etcd did not become healthy in {timeout}s: {self.log_tail()}")

    def healthy(self) -> bool:
        """True when the member answers /health (run inside its namespace if it has one)."""
        if self.netns is None:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False
        res = subprocess.run([*self._prefix(), "etcdctl", "--endpoints", self.endpoint,
                              "endpoint", "health"], capture_output=True, timeout=10,
                             env={**os.environ, "ETCDCTL_API": "3"})
        return res.returncode == 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def etcdctl(self, *args: str, api: int = 3, check: bool = True,
                timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against this member, with ETCDCTL_API set as flannel users do."""
        env = {**os.environ, "ETCDCTL_API": str(api)}
        argv = [*self._prefix(), "etcdctl", "--endpoints", self.endpoint, *args]
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res

    def pause(self) -> None:
        """Stop the process (SIGSTOP): clients see a hung server, as in a partition."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Stop the member but keep its data, so :meth:`start` brings it back as it was.
        ``sig=signal.SIGKILL`` for a crash (no clean shutdown, connections reset)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """Stop the member and remove its data directory (if we made it)."""
        self.kill()
        if self._owned_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = ""


@contextlib.contextmanager
def etcd_server(host: str = "127.0.0.1", netns: str | None = None) -> Iterator[EtcdServer]:
    """A started etcd that is always stopped and removed afterwards."""
    server = EtcdServer(host=host, netns=netns)
    try:
        yield server.start()
    finally:
        server.stop()


@dataclass
class EtcdCluster:
    """``size`` etcd members forming one cluster on ``host`` (inside ``netns`` if set).

    Member i serves clients on ``base_port + 2 * i`` and peers on the port after it;
    all data lives in one temporary directory, removed by :meth:`stop`. Killing a
    member (:meth:`EtcdServer.kill`) keeps its data; ``member.start()`` rejoins it.
    """

    host: str = "127.0.0.1"
    netns: str | None = None
    size: int = 3
    base_port: int = 0  # 0: free ports on the host (or 12379 inside a namespace)
    members: list[EtcdServer] = field(default_factory=list)
    workdir: str = ""

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _ports(self) -> list[tuple[int, int]]:
        if self.base_port:
            return [(self.base_port + 2 * i, self.base_port + 2 * i + 1)
                    for i in range(self.size)]
        if self.netns is not None:
            return [(12379 + 2 * i, 12380 + 2 * i) for i in range(self.size)]
        ports: list[int] = []
        while len(ports) < 2 * self.size:
            port = free_port(self.host)
            if port not in ports:
                ports.append(port)
        return [(ports[2 * i], ports[2 * i + 1]) for i in range(self.size)]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member, then wait until each is healthy; EtcdError (all stopped)
        if one is not."""
        if shutil.which("etcd") is None:
            raise EtcdError("etcd is not installed (Debian package etcd-server)")
        self.workdir = tempfile.mkdtemp(prefix="flannelette-etcd-cluster-")
        token = f"fl-{os.path.basename(self.workdir)}"
        ports = self._ports()
        names = [f"m{i}" for i in range(self.size)]
        initial = ",".join(f"{n}=http://{self.host}:{pp}" for n, (_, pp) in zip(names, ports,
                                                                                 strict=True))
        try:
            for name, (cp, pp) in zip(names, ports, strict=True):
                data = os.path.join(self.workdir, name)
                os.makedirs(data)
                member = EtcdServer(host=self.host, netns=self.netns, port=cp, peer_port=pp,
                                    data_dir=data, name=name, initial_cluster=initial,
                                    cluster_token=token)
                self.members.append(member)
                member.start(wait=False)
            for member in self.members:
                member.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def etcdctl(self, *args: str, api: int = 3, check: bool = True,
                timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """etcdctl against the members that run now (v3 fails over between them; v2
        etcdctl tries its endpoints in turn)."""
        live = [m for m in self.members if m.running]
        if not live:
            raise EtcdError("no etcd member is running")
        env = {**os.environ, "ETCDCTL_API": str(api)}
        argv = [*live[0]._prefix(), "etcdctl", "--endpoints",
                ",".join(m.endpoint for m in live), *args]
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res

    def stop(self) -> None:
        """Stop every member and remove the data of all of them."""
        for member in self.members:
            with contextlib.suppress(Exception):
                member.kill()
        self.members.clear()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
