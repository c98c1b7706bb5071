"""The network-namespace lab: hosts on L2 segments, a router, containers behind hosts.

Tests, the demo and the benchmarks all build their topology with this module.
Everything it creates carries a per-run tag in its name, so two runs never
collide, and :meth:`Lab.close` (also run by the context manager, on errors and
on Ctrl-C) stops every process it started and deletes every namespace, which
takes the veth pairs and bridges inside them along.

Topology::

    container ns            host ns                      core ns (switch + router)
    eth0 10.244.1.2/24 --- cni0 10.244.1.1/24
                            eth0 10.10.1.1/24 ---------- brA 10.10.1.254/24
                                                         brB 10.10.2.254/24 --- h3 ...
                                                         ext 10.99.0.254/24 --- outside ns

Each segment is a bridge in the core namespace; the core namespace also routes
between segments (its address on each bridge is the segments' gateway), so a
host on segment B reaches segment A only through a gateway, which is exactly
what flannel's DirectRouting test tells apart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


class LabError(RuntimeError):
    """A lab command failed; the message names the namespace and the command."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
         capture: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=capture, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Segment:
    """One L2 segment: a bridge in the core namespace."""

    name: str
    network: ipaddress.IPv4Network
    bridge: str
    gateway: ipaddress.IPv4Address
    next_host: int = 1


@dataclass
class Host:
    """A "machine": a namespace with one NIC (eth0) on a segment."""

    name: str
    ns: str
    segment: Segment
    ip: ipaddress.IPv4Address
    iface: str = "eth0"
    subnet: ipaddress.IPv4Network | None = None
    container_ns: str | None = None
    container_ip: ipaddress.IPv4Address | None = None
    bridge_ip: ipaddress.IPv4Address | None = None


@dataclass
class Lab:
    """A disposable topology of namespaces. Use as a context manager."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    mtu: int = 1500
    segments: dict[str, Segment] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    outside: dict[str, tuple[str, ipaddress.IPv4Address]] = field(default_factory=dict)
    _links: int = 0

    def __post_init__(self) -> None:
        self.core = self._ns_name("core")

    # ---- naming -----------------------------------------------------------------------
    def _ns_name(self, name: str) -> str:
        return f"fl{self.tag}-{name}"

    def _link_name(self) -> str:
        """Interface names are limited to 15 bytes; these are unique per lab."""
        self._links += 1
        return f"v{self.tag}{self._links}"

    # ---- building ---------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self._add_ns(self.core)
        self.sysctl(self.core, "net.ipv4.ip_forward", "1")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self.ip(ns, "link", "set", "lo", "up")

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `ip` inside namespace ``ns``."""
        return _run(["ip", "-n", ns, *args], check=check)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, "sysctl", "-q", "-w", f"{key}={value}")

    def add_segment(self, name: str, cidr: str) -> Segment:
        """An L2 segment: a bridge in the core namespace, the core's address as gateway."""
        net = ipaddress.IPv4Network(cidr)
        seg = Segment(name, net, f"br{name}", net.broadcast_address - 1)
        self.ip(self.core, "link", "add", seg.bridge, "type", "bridge")
        self.ip(self.core, "link", "set", seg.bridge, "mtu", str(self.mtu), "up")
        self.ip(self.core, "addr", "add", f"{seg.gateway}/{net.prefixlen}", "dev", seg.bridge)
        self.segments[name] = seg
        return seg

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair with one end in each namespace, both up."""
        tmp_a, tmp_b = self._link_name(), self._link_name()
        _run(["ip", "link", "add", tmp_a, "mtu", str(self.mtu), "type", "veth",
              "peer", "name", tmp_b, "mtu", str(self.mtu)])
        _run(["ip", "link", "set", tmp_a, "netns", ns_a, "name", name_a])
        _run(["ip", "link", "set", tmp_b, "netns", ns_b, "name", name_b])
        self.ip(ns_a, "link", "set", name_a, "up")
        self.ip(ns_b, "link", "set", name_b, "up")

    def add_host(self, name: str, segment: str, subnet: str | None = None,
                 ip: str | None = None) -> Host:
        """A host on ``segment``; with ``subnet``, also a container behind it (.2, gw .1)."""
        seg = self.segments[segment]
        ns = self._ns_name(name)
        self._add_ns(ns)
        if ip is None:
            addr = seg.network.network_address + seg.next_host
            seg.next_host += 1
        else:
            addr = ipaddress.IPv4Address(ip)
        port = f"p-{name}"[:15]
        self._veth(ns, "eth0", self.core, port)
        self.ip(self.core, "link", "set", port, "master", seg.bridge)
        self.ip(ns, "addr", "add", f"{addr}/{seg.network.prefixlen}", "dev", "eth0")
        self.ip(ns, "route", "add", "default", "via", str(seg.gateway))
        self.sysctl(ns, "net.ipv4.ip_forward", "1")
        host = Host(name, ns, seg, addr)
        if subnet is not None:
            self._add_container(host, ipaddress.IPv4Network(subnet))
        self.hosts[name] = host
        return host

    def _add_container(self, host: Host, subnet: ipaddress.IPv4Network) -> None:
        cns = self._ns_name(f"{host.name}c")
        self._add_ns(cns)
        gw, cip = subnet.network_address + 1, subnet.network_address + 2
        self._veth(host.ns, "cni0", cns, "eth0")
        self.ip(host.ns, "addr", "add", f"{gw}/{subnet.prefixlen}", "dev", "cni0")
        self.ip(cns, "addr", "add", f"{cip}/{subnet.prefixlen}", "dev", "eth0")
        self.ip(cns, "route", "add", "default", "via", str(gw))
        host.subnet, host.container_ns, host.container_ip, host.bridge_ip = subnet, cns, cip, gw

    def add_outside(self, name: str, cidr: str) -> tuple[str, ipaddress.IPv4Address]:
        """A namespace standing for "the world outside the overlay", routed by the core."""
        net = ipaddress.IPv4Network(cidr)
        ns = self._ns_name(name)
        self._add_ns(ns)
        core_if = f"x-{name}"[:15]
        self._veth(ns, "eth0", self.core, core_if)
        gw, addr = net.broadcast_address - 1, net.network_address + 1
        self.ip(self.core, "addr", "add", f"{gw}/{net.prefixlen}", "dev", core_if)
        self.ip(ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0")
        self.ip(ns, "route", "add", "default", "via", str(gw))
        self.outside[name] = (ns, addr)
        return ns, addr

    # ---- running ----------------------------------------------------------------------
    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 60.0
            ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside ``ns``."""
        return _run(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout)

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside ``ns``; the lab stops it on close."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def ping(self, ns: str, dst: str | ipaddress.IPv4Address, count: int = 3,
             timeout: float = 1.0, interval: float = 0.2) -> subprocess.CompletedProcess[str]:
        """A bounded ping from ``ns`` (count packets, each waiting at most ``timeout``)."""
        return self.run(ns, "ping", "-n", "-q", "-c", str(count), "-i", str(interval),
                        "-W", str(timeout), str(dst), check=False,
                        timeout=count * (interval + timeout) + 10)

    def wait_ping(self, ns: str, dst: str | ipaddress.IPv4Address, deadline: float = 20.0
                  ) -> bool:
        """Ping once per attempt until an answer or ``deadline`` seconds pass."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.ping(ns, dst, count=1, timeout=1.0).returncode == 0:
                return True
            time.sleep(0.2)
        return False

    @staticmethod
    def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        """SIGTERM the process group we started, then SIGKILL if it does not go."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        return proc.returncode

    def close(self) -> None:
        """Stop every process and delete every namespace this lab made."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()


@contextlib.contextmanager
def two_hosts(subnets: tuple[str, str] = ("10.244.1.0/24", "10.244.2.0/24"),
              segment: str = "10.10.1.0/24") -> Iterator[Lab]:
    """The smallest useful lab: h1 and h2 on one segment, a container behind each."""
    with Lab() as lab:
        lab.add_segment("A", segment)
        lab.add_host("h1", "A", subnets[0])
        lab.add_host("h2", "A", subnets[1])
        yield lab
