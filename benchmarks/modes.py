"""The dataplane modes the benchmark compares, each set up on the same two-host topology.

Topology (built fresh and identically for every mode, so no state leaks between
modes): hosts h1 and h2 on one L2 segment 10.10.1.0/24, a container behind each
(10.244.1.2 and 10.244.2.2). Traffic always runs container to container,
h1's container to h2's, so every mode forwards through both hosts.

A mode's ``setup`` configures the hosts and returns the dataplane processes it
started (for CPU accounting; none for kernel-only modes). A mode whose code has
not landed in the tree raises :class:`ModeUnavailable`; the report then says
"not done" for it instead of inventing numbers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.lab import Host, Lab
from dataplane import wire

SEGMENT = "10.10.1.0/24"
SUBNETS = ("10.244.1.0/24", "10.244.2.0/24")
NETWORK = "10.244.0.0/16"
VNI = 1
VXLAN_OVERHEAD = wire.OVERHEAD  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
# A checkout of an older flannelette whose engine modes run beside this one ("base-fl-*").
BASELINE_ENV = "FLANNELETTE_BENCH_BASELINE"


class ModeUnavailable(Exception):
    """The code this mode needs is not in the tree (yet); the message says what is missing."""


@dataclass(frozen=True)
class Pair:
    """The benchmark topology: a client host and a server host, each with a container."""

    lab: Lab
    client: Host
    server: Host
    log_dir: str = ""  # where dataplane processes write their output ("" = discard)
    mode: str = ""
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run before lab.close

    def close(self) -> None:
        """Undo what the mode started outside the lab's own bookkeeping (e.g. etcd)."""
        while self.cleanups:
            with contextlib.suppress(Exception):
                self.cleanups.pop()()

    def popen_logged(self, host: Host, *argv: str, cwd: str | None = None
                     ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``'s namespace, output to ``<log_dir>/<mode>-<host>.log``."""
        if not self.log_dir:
            return self.lab.popen(host.ns, *argv, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, cwd=cwd)
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, f"{self.mode or 'mode'}-{host.name}.log")
        with open(path, "ab") as log:  # Popen keeps its own descriptor
            return self.lab.popen(host.ns, *argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)

    @property
    def client_ns(self) -> str:
        assert self.client.container_ns is not None
        return self.client.container_ns

    @property
    def server_ns(self) -> str:
        assert self.server.container_ns is not None
        return self.server.container_ns

    @property
    def server_ip(self) -> str:
        return str(self.server.container_ip)


def build_pair(lab: Lab, log_dir: str = "", mode: str = "") -> Pair:
    """Two hosts on one segment with a container each (identical for every mode)."""
    lab.add_segment("A", SEGMENT)
    h1 = lab.add_host("h1", "A", SUBNETS[0])
    h2 = lab.add_host("h2", "A", SUBNETS[1])
    return Pair(lab, h1, h2, log_dir, mode)


Setup = Callable[[Pair], list[subprocess.Popen[Any]]]


@dataclass(frozen=True)
class Mode:
    """One way of carrying container traffic between the two hosts."""

    name: str
    description: str
    setup: Setup
    userspace: bool  # True: the dataplane's CPU is in processes we can account


# ---- host-gw: plain routes, the limit -------------------------------------------------
def setup_host_gw(pair: Pair) -> list[subprocess.Popen[Any]]:
    """Flannel's host-gw: each host routes the peer's subnet via the peer's address."""
    for a, b in ((pair.client, pair.server), (pair.server, pair.client)):
        pair.lab.ip(a.ns, "route", "replace", str(b.subnet), "via", str(b.ip), "dev", a.iface)
    return []


# ---- kernel VXLAN as flannel configures it: the anchor --------------------------------
def _module(name: str, what: str) -> Any:
    if importlib.util.find_spec(name) is None:
        raise ModeUnavailable(f"{name} ({what}) is not in the tree yet")
    return importlib.import_module(name)


def setup_kernel_vxlan(pair: Pair) -> list[subprocess.Popen[Any]]:
    """flannel.1 devices with neighbour, FDB and onlink routes, by benchmarks.kernel_vxlan."""
    kv = _module("benchmarks.kernel_vxlan", "flannel-style kernel VXLAN setup")
    devs = [(h, kv.KernelVxlan.create(h.ns, subnet=str(h.subnet), public_ip=str(h.ip), vni=VNI,
                                      dev=h.iface, mac=vtep_mac(h)))
            for h in (pair.client, pair.server)]
    for (_, dev), (peer, peer_dev) in ((devs[0], devs[1]), (devs[1], devs[0])):
        dev.add_peer(str(peer.subnet), str(peer.ip), peer_dev.mac)
    return []


# ---- flannelette's userspace engine ---------------------------------------------------
def _engine_help(tree: str | None = None) -> str:
    """`flannelette engine --help` of this tree or of the checkout ``tree`` ("" if that
    cannot run: the modes then fail at setup, with the reason)."""
    try:
        res = subprocess.run([sys.executable, "-m", "control.cli", "engine", "--help"],
                             capture_output=True, text=True, timeout=30, cwd=tree)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout


def engine_options() -> dict[str, list[str]]:
    """The option axes the standalone engine offers (from its --help): loop, offload,
    batch, and UDP GSO/GRO without TUN offloads."""
    if importlib.util.find_spec("dataplane.standalone") is None:
        return {}
    text = _engine_help()
    axes: dict[str, list[str]] = {}
    if "--loop" in text:
        axes["loop"] = [x for x in ("uvloop", "asyncio") if x in text]  # the default first
    if re.search(r"--offload\b", text):
        axes["offload"] = ["off", "on"]  # the default first
    if re.search(r"--batch\b", text):
        axes["batch"] = ["1"]  # one packet per wake-up, against the default drain
    if re.search(r"--tunnel-gso\b", text):
        axes["tunnel"] = ["on"]  # the kernel segments encapsulated super-packets
    if re.search(r"--workers\b", text):
        axes["workers"] = ["2"]  # engine processes on a multi-queue TUN + SO_REUSEPORT
    if re.search(r"--tx-gso\b", text) and re.search(r"--rx-gro\b", text):
        axes["gso"] = ["off"]  # one datagram per system call, against the default GSO/GRO
    return axes


def vtep_mac(host: Host) -> str:
    """A fixed, locally administered unicast VtepMAC per host: 02:f1:00:00:00:<last IP octet>."""
    return f"02:f1:00:00:00:{int(host.ip) & 0xFF:02x}"


def setup_engine(pair: Pair, extra: list[str], flannelette_peer: bool = False,
                 tree: str | None = None) -> list[subprocess.Popen[Any]]:
    """`flannelette engine` on both hosts with each other as static peer.

    The standalone engine installs its own routes (peer subnet into the TUN). With
    ``flannelette_peer`` each side knows the other is a flannelette node (as the
    lease's ``Flannelette.CsumPartial`` tells agents), so inner TCP checksums stay
    partial on the wire. ``tree`` runs the engine from another checkout of the
    project (``python -m`` puts the working directory first on the path), so an
    older version can be measured beside this one in the same run.
    """
    _module("dataplane.standalone", "the standalone engine runner")
    mtu = pair.lab.mtu - VXLAN_OVERHEAD
    procs = []
    for me, peer in ((pair.client, pair.server), (pair.server, pair.client)):
        argv = [sys.executable, "-m", "control.cli", "engine", "--subnet", str(me.subnet),
                "--public-ip", str(me.ip), "--vtep-mac", vtep_mac(me), "--vni", str(VNI),
                "--mtu", str(mtu), "--peer",
                f"{peer.subnet},{peer.ip},{vtep_mac(peer)}"
                + (",flannelette" if flannelette_peer else ""), *extra]
        procs.append(pair.popen_logged(me, *argv, cwd=tree))
    return procs


def setup_mixed(pair: Pair, engine_on: str, extra: list[str]) -> list[subprocess.Popen[Any]]:
    """One host runs `flannelette engine`, the other a kernel flannel.1 (interop speed).

    ``engine_on`` is "client" (flannelette -> kernel) or "server" (kernel -> flannelette).
    """
    kv = _module("benchmarks.kernel_vxlan", "flannel-style kernel VXLAN setup")
    _module("dataplane.standalone", "the standalone engine runner")
    me, other = ((pair.client, pair.server) if engine_on == "client"
                 else (pair.server, pair.client))
    dev = kv.KernelVxlan.create(other.ns, subnet=str(other.subnet), public_ip=str(other.ip),
                                vni=VNI, dev=other.iface, mac=vtep_mac(other))
    dev.add_peer(str(me.subnet), str(me.ip), vtep_mac(me))
    argv = [sys.executable, "-m", "control.cli", "engine", "--subnet", str(me.subnet),
            "--public-ip", str(me.ip), "--vtep-mac", vtep_mac(me), "--vni", str(VNI),
            "--mtu", str(pair.lab.mtu - VXLAN_OVERHEAD), "--peer",
            f"{other.subnet},{other.ip},{dev.mac}", *extra]
    return [pair.popen_logged(me, *argv)]


def setup_direct_routing(pair: Pair, direct_routing: bool = True
                         ) -> list[subprocess.Popen[Any]]:
    """Two `flannelette run` agents with default flags, vxlan backend, via a real etcd.

    With DirectRouting the hosts share a segment, so each agent must choose the
    direct route for the other; without, the tunnel. The setup fails (rather than
    measuring another path under this name) if either agent reports another path.
    """
    _module("control.agent", "the agent, flannelette run")
    cl = _module("benchmarks.cluster", "etcd + agents in the lab")
    cluster = cl.Cluster(pair.lab)

    def close() -> None:
        if pair.log_dir:  # keep the agents' logs; the cluster removes its work directory
            os.makedirs(pair.log_dir, exist_ok=True)
            for agent in cluster.agents:
                with open(os.path.join(pair.log_dir, f"{pair.mode}-{agent.host.name}.log"),
                          "w") as f:
                    f.write(agent.log())
        cluster.close()

    pair.cleanups.append(close)
    cluster.start_etcd()
    cluster.set_config({"Network": NETWORK,
                        "Backend": {"Type": "vxlan", "DirectRouting": direct_routing}}, api=3)
    agents = [cluster.start_agent(h, api="v3", timeout=60.0)
              for h in (pair.client, pair.server)]
    for agent, peer in ((agents[0], pair.server), (agents[1], pair.client)):
        doc = cluster.wait_peers(agent, [str(peer.subnet)], timeout=60.0)
        paths = {p["subnet"]: p.get("path") for p in doc["peers"]}
        want = "direct" if direct_routing else "vxlan"
        if paths.get(str(peer.subnet)) != want:
            raise RuntimeError(f"agent on {agent.host.name} chose {paths} for a same-segment "
                               f"peer, not {want}")
    return [a.proc for a in agents]


def all_modes() -> list[Mode]:
    """Every mode, in report order: the limit, the anchor, then flannelette's variants."""
    modes = [
        Mode("host-gw", "plain routes via the peer host (flannel host-gw): the limit",
             setup_host_gw, False),
        Mode("kernel-vxlan", "Linux VXLAN device flannel.1 configured as flannel does: "
             "the anchor", setup_kernel_vxlan, False),
    ]
    axes = engine_options()
    loops = axes.get("loop") or ["default"]
    offloads = axes.get("offload") or [""]
    variants: list[tuple[str, list[str]]] = []
    for loop in loops:
        for off in offloads:
            extra = [] if loop == "default" else ["--loop", loop]
            name = "fl-" + loop
            if off:
                extra += ["--offload", off]
                name += "-offload" if off == "on" else ""
                if off == "on" and "tunnel" in axes:  # the split path; tunnel GSO is its own
                    extra += ["--tunnel-gso", "off"]
            variants.append((name, extra))
    for batch in axes.get("batch", []):  # on top of the first (default) variant
        name, extra = variants[0]
        variants.append((f"{name}-batch{batch}", [*extra, "--batch", batch]))
    for gso in axes.get("gso", []):
        name, extra = variants[0]
        variants.append((f"{name}-nogso", [*extra, "--tx-gso", gso, "--rx-gro", gso]))
    for name, extra in variants:
        modes.append(Mode(name, f"flannelette userspace VXLAN engine ({' '.join(extra)})",
                          functools.partial(setup_engine, extra=extra), True))
    if "on" in offloads:  # offload between two flannelette peers: partial inner checksums
        extra = ["--offload", "on"] + (["--tunnel-gso", "off"] if "tunnel" in axes else [])
        modes.append(Mode("fl-offload-partial", "flannelette engine, offloads on, peers "
                          "known as flannelette (inner TCP checksums left partial)",
                          functools.partial(setup_engine, extra=extra, flannelette_peer=True),
                          True))
    if "tunnel" in axes:
        modes.append(Mode("fl-tunnel-gso", "flannelette engine, offloads on, TCP super-packets "
                          "wrapped once and segmented by the kernel (--tunnel-gso on)",
                          functools.partial(setup_engine, extra=["--offload", "on",
                                                                 "--tunnel-gso", "on"]), True))
    for n in axes.get("workers", []):
        modes.append(Mode(f"fl-workers{n}", f"flannelette engine, offloads on, {n} worker "
                          f"processes (--offload on --workers {n})",
                          functools.partial(setup_engine, extra=["--offload", "on",
                                                                 "--workers", n]), True))
    tree = os.environ.get(BASELINE_ENV, "")
    if tree:  # the same engine modes from an older checkout, for before/after ratios
        # The same path as the namesake here: an older tree that has tunnel GSO (auto by
        # default) gets it turned off, as fl-uvloop-offload does; one without has none.
        no_tunnel = ["--tunnel-gso", "off"] if "--tunnel-gso" in _engine_help(tree) else []
        for name, extra, partial in (("fl-uvloop", [], False),
                                     ("fl-uvloop-offload", ["--offload", "on", *no_tunnel], False),
                                     ("fl-offload-partial", ["--offload", "on", *no_tunnel], True)):
            modes.append(Mode(f"base-{name}", f"{name} run from {tree} ({BASELINE_ENV})",
                              functools.partial(setup_engine, extra=extra,
                                                flannelette_peer=partial, tree=tree), True))
    if "tunnel" in axes:  # both directions of interop, with the engine's fastest settings
        fast = ["--offload", "on"]
        modes.append(Mode("mix-fl-to-kernel", "flannelette engine (offload on) sending to a "
                          "kernel flannel.1", functools.partial(setup_mixed, engine_on="client",
                                                                extra=fast), True))
        modes.append(Mode("mix-kernel-to-fl", "kernel flannel.1 sending to a flannelette "
                          "engine (offload on)", functools.partial(setup_mixed,
                                                                   engine_on="server",
                                                                   extra=fast), True))
    modes.append(Mode("fl-agent-default", "two `flannelette run` agents with default flags, "
                      "vxlan backend (the tunnel)",
                      functools.partial(setup_direct_routing, direct_routing=False), True))
    modes.append(Mode("fl-directrouting", "flannelette agents, vxlan backend with "
                      "DirectRouting on a same-segment pair", setup_direct_routing, True))
    return modes
