"""A real, throwaway etcd server (Debian's etcd 3.4) for tests, the demo and benchmarks.

Started with ``--enable-v2=true`` so both of flannel's APIs are served, on a
free port, with a temporary data directory that is removed on stop. It runs
either on 127.0.0.1 in the current namespace or inside a lab namespace on that
namespace's addresses (so agents inside the lab can reach it).
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
    _owned_dir: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start etcd and wait until it answers /health; raise EtcdError if it does not."""
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
        name = f"fl-{self.port}"
        argv = [
            *self._prefix(), "etcd", "--name", name,
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-cluster", f"{name}=http://{self.host}:{self.peer_port}",
            "--enable-v2=true", "--log-level", "warn", "--logger", "zap",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
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

    def kill(self) -> None:
        """Stop the member but keep its data, so :meth:`start` brings it back as it was."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
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
