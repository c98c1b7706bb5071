"""`flannelette demo`: flannel's three models, one after another, on one machine.

Builds a namespace lab (h1 and h2 on segment A, h3 on segment B behind a
router, a "container" behind each host), starts a real etcd inside it, writes
the network config with ``etcdctl`` exactly as the seed write-up does, runs one
`flannelette run` agent per host and walks through host-gw, vxlan and
vxlan + DirectRouting. For each model it shows each agent's path per peer (from
its /status), h1's kernel routes, container-to-container pings with RTTs, a
short iperf3 TCP figure per path and the tunnel counters; at the end a summary
table. Everything is torn down afterwards, also on Ctrl-C, SIGTERM or a failed
step (exit 1, with the reason). ``--keep`` leaves the lab running and prints
how to enter and remove it (``flannelette demo --cleanup TAG``).

The demo checks what it shows: a ping that should work and does not, a peer
whose path is not the model's, or a ping that should fail and works, is a
failed step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from benchmarks.cluster import PREFIX, AgentProcess, Cluster, ClusterError
from benchmarks.etcd import EtcdError
from benchmarks.lab import Host, Lab, LabError
from benchmarks.traffic import TrafficError, iperf_tcp, parse_ping_rtts, start_iperf_server
from control.table import table

NETWORK = "10.7.0.0/16"
SEED_NETWORK = "172.7.0.0/16"
CONFIG_KEY = f"{PREFIX}/config"
# (name, segment, container subnet)
HOSTS = (("h1", "A", "10.7.1.0/24"), ("h2", "A", "10.7.2.0/24"), ("h3", "B", "10.7.3.0/24"))
SEGMENTS = (("A", "10.10.1.0/24"), ("B", "10.10.2.0/24"))
PING_PAIRS = (("h1", "h2"), ("h1", "h3"), ("h2", "h3"))
TCP_PAIRS = (("h1", "h2"), ("h1", "h3"))
STATE_PREFIX = "flannelette-demo-"


class DemoError(RuntimeError):
    """A step did not give what it should; the message says what and where to look."""


class Interrupted(BaseException):
    """SIGTERM arrived (SIGINT arrives as KeyboardInterrupt)."""


# ---- the three models -------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """One of the seed's models: its etcd config and what a newcomer should know."""

    name: str
    config: str
    backend: str  # what the agents report as node.backend
    direct_routing: bool
    about: tuple[str, ...]

    def expected_path(self, same_segment: bool) -> str:
        if self.backend == "host-gw":
            return "direct" if same_segment else "unreachable"
        if self.direct_routing and same_segment:
            return "direct"
        return "vxlan"


def _config(backend: str) -> str:
    """The seed's config string with our Network: '{"Network":"...","Backend":{...}}'."""
    return '{"Network":"' + NETWORK + '","Backend":' + backend + '}'


MODELS = (
    Model("host-gw", _config('{"Type":"host-gw"}'), "host-gw",
          False, (
              "Each agent adds one plain kernel route per peer: '<peer's container subnet> via",
              "<peer's host address>', the line `route -n` shows in the seed (172.7.22.0 via",
              "192.168.14.22). Packets are not wrapped in anything: the fastest model. Its",
              "precondition: every host on one L2 segment, because a route's next hop must be",
              "directly reachable. h3 sits behind a router, so h1 and h2 cannot route to it:",
              "the agents skip it with a warning (as flannel does) and pings to h3's",
              "container fail. That is expected.")),
    Model("vxlan", _config('{"Type":"VxLAN"}'), "vxlan", False, (
        "Each agent runs a VXLAN endpoint (flannel.1; here a userspace engine behind a TUN",
        "device) and sends container packets inside UDP port 8472 to the peer's host, in the",
        "same wire format as Linux's own VXLAN. That crosses routers, so h3 is reachable now.",
        "The price: 50 bytes of headers per packet (MTU 1450) and, here, a userspace hop.",
        "Note that h1 <-> h2 also goes through the tunnel, although they share a segment.")),
    Model("vxlan+DirectRouting",
          _config('{"Type":"VxLAN","Directrouting":true}'), "vxlan",
          True, (
              "VxLAN with \"Directrouting\":true: a peer on the same L2 segment gets a host-gw",
              "style route, the others are tunnelled. \"Same segment\" is decided as flannel",
              "does: the kernel's route to the peer's host address has no gateway. So h1 <-> h2",
              "go direct (host-gw speed), h1 <-> h3 and h2 <-> h3 through VXLAN.")),
)


ROUTE_NOTES = {
    "host-gw": "one route per peer on h1's segment, straight to that host; none for h3",
    "vxlan": "one route sends the whole Network into the tunnel device; the engine picks "
             "the peer host by destination subnet",
    "vxlan+DirectRouting": "the /24 via h2 is more specific than the Network route into "
                           "flannel.1, so h2's containers are reached directly",
}


# ---- progress ---------------------------------------------------------------------------------
class Progress:
    """One line per step: a spinner on a terminal, plain start/end lines otherwise."""

    FRAMES = "|/-\\"

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.t0 = time.monotonic()

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _spin(self, text: str, start: float, done: threading.Event) -> None:
        # A wrapped line cannot be redrawn with \r: keep the spinner line inside the width.
        width = shutil.get_terminal_size((100, 24)).columns - 16
        if len(text) > width:
            text = text[:max(width - 3, 10)] + "..."
        i = 0
        while not done.wait(0.1):
            self.out.write(f"\r  [{self.FRAMES[i % 4]}] {text}  {time.monotonic() - start:.1f}s")
            self.out.flush()
            i += 1

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        start = time.monotonic()
        done = threading.Event()
        spinner = None
        if self.tty:
            spinner = threading.Thread(target=self._spin, args=(text, start, done), daemon=True)
            spinner.start()
        else:
            self.say(f"  [..] {text}")
        ok = False
        try:
            yield
            ok = True
        finally:
            done.set()
            if spinner is not None:
                spinner.join()
                self.out.write("\r\x1b[K")
            mark = "ok" if ok else "FAILED"
            self.say(f"  [{mark}] {text} ({time.monotonic() - start:.1f} s)")


# ---- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PingResult:
    model: str
    src: str
    dst: str
    path: str
    sent: int
    received: int
    rtts: tuple[float, ...]

    @property
    def loss(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 100.0


@dataclass(frozen=True)
class TcpResult:
    model: str
    src: str
    dst: str
    path: str
    gbps: float | None
    note: str = ""


def rtt_text(rtts: Sequence[float]) -> str:
    if not rtts:
        return "-"
    return f"{min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/{max(rtts):.3f} ms"


def rate_text(gbps: float | None) -> str:
    if gbps is None:
        return "-"
    return f"{gbps:.2f} Gbit/s" if gbps >= 1 else f"{gbps * 1000:.0f} Mbit/s"


# ---- the demo ---------------------------------------------------------------------------------
@dataclass
class Options:
    quick: bool = False
    keep: bool = False
    break_forwarding: bool = False
    live: bool = True
    models: tuple[Model, ...] = MODELS

    @property
    def ping_count(self) -> int:
        return 3 if self.quick else 10

    @property
    def tcp_seconds(self) -> int:
        return 1 if self.quick else 2

    @property
    def converge(self) -> float:
        return 15.0 if self.quick else 30.0


@dataclass
class Demo:
    opts: Options
    progress: Progress
    lab: Lab | None = None
    cluster: Cluster | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    pings: list[PingResult] = field(default_factory=list)
    tcp: list[TcpResult] = field(default_factory=list)
    pids: dict[int, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    has_iperf: bool = True

    # ---- helpers -------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self.progress.say(text)

    @property
    def L(self) -> Lab:
        assert self.lab is not None
        return self.lab

    @property
    def C(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    def host(self, name: str) -> Host:
        return self.L.hosts[name]

    def same_segment(self, a: str, b: str) -> bool:
        return self.host(a).segment.name == self.host(b).segment.name

    def etcdctl_line(self, *args: str) -> str:
        quoted = " ".join(a if re.fullmatch(r"[\w/.:-]+", a) else f"'{a}'" for a in args)
        return f"ETCDCTL_API=2 etcdctl --endpoints {self.C.endpoint} {quoted}"

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> None:
        self.say("flannelette demo: flannel's three models (host-gw, vxlan, vxlan+DirectRouting)"
                 " on one machine, in network namespaces that are removed afterwards.")
        self.say(f"Mode: {'quick' if self.opts.quick else 'full'} ({self.opts.ping_count} pings"
                 f" per pair, {self.opts.tcp_seconds} s of iperf3 TCP per path).")
        self.say()
        self.build()
        for i, model in enumerate(self.opts.models, 1):
            self.run_model(i, model)
        self.summary()

    def build(self) -> None:
        lab = Lab()
        self.lab = lab
        with self.progress.step(f"building the lab (namespaces fl{lab.tag}-*)"):
            lab.__enter__()
            for name, cidr in SEGMENTS:
                lab.add_segment(name, cidr)
            for name, seg, subnet in HOSTS:
                lab.add_host(name, seg, subnet)
            if self.opts.break_forwarding:
                # An honest failure for the tests: h2 stops forwarding, so nothing can
                # reach its container and the first ping step must fail.
                lab.sysctl(self.host("h2").ns, "net.ipv4.ip_forward", "0")
            self.cluster = Cluster(lab)
            self.dirs.append(self.C.workdir)
        self.has_iperf = shutil.which("iperf3") is not None
        if self.has_iperf:
            with self.progress.step("starting an iperf3 server in each container"):
                for h in self.L.hosts.values():
                    assert h.container_ns is not None
                    proc = start_iperf_server(self.L, h.container_ns, str(h.container_ip))
                    self.pids[proc.pid] = f"iperf3 server in {h.container_ns}"
        with self.progress.step("starting etcd 3.4 (v2 API enabled) in the lab"):
            etcd = self.C.start_etcd()
            assert etcd.proc is not None
            self.pids[etcd.proc.pid] = "etcd"
            self.dirs.append(etcd.data_dir)
        self.topology()

    def topology(self) -> None:
        h = self.L.hosts
        a, b = self.L.segments["A"], self.L.segments["B"]
        self.say()
        self.say(f"The lab (tag {self.L.tag}):")
        self.say(f"    h1c {h['h1'].container_ip!s:<12} h2c {h['h2'].container_ip!s:<12}"
                 f"          h3c {h['h3'].container_ip}      <- containers")
        self.say("     |                  |                          |")
        self.say(f"    h1 {h['h1'].ip!s:<13} h2 {h['h2'].ip!s:<13}"
                 f"          h3 {h['h3'].ip}        <- hosts (agents)")
        self.say("     |__________________|                          |")
        self.say(f"      segment A {a.network}              segment B {b.network}")
        self.say(f"            |___ router {a.gateway} | {b.gateway} ___|")
        self.say(f"    etcd: {self.C.endpoint} (in the router's namespace); "
                 f"Network {NETWORK} (the seed uses {SEED_NETWORK}; this lab keeps to "
                 "10.x addresses)")
        self.say(f"    processes: {', '.join(f'{w} pid {p}' for p, w in self.pids.items())}")
        self.say(f"    temporary directories: {', '.join(self.dirs)}")
        self.say()

    # ---- one model ---------------------------------------------------------------------
    def run_model(self, index: int, model: Model) -> None:
        self.say("=" * 78)
        self.say(f"Model {index} of {len(self.opts.models)}: {model.name}")
        self.say("=" * 78)
        for line in model.about:
            self.say("  " + line)
        self.say()
        live = self.opts.live and bool(self.agents)
        if live:
            self.say("  The seed's procedure is: stop flannel on every host, replace the config in"
                     " etcd, start")
            self.say("  flannel again. flannelette agents watch the config key and switch in"
                     " place, so the demo")
            self.say("  only replaces the config (--restart follows the seed to the letter).")
        else:
            self.say("  The seed's procedure: stop flannel on every host, replace the config in"
                     " etcd, start flannel again.")
        if self.agents and not live:
            with self.progress.step("stopping the agents (the seed: supervisorctl stop "
                                    "flannel-21)"):
                self.stop_agents()
        before = {name: a.proc.pid for name, a in self.agents.items()}
        commands: list[tuple[str, ...]] = []
        if index > 1 or self.C.etcdctl("get", CONFIG_KEY, api=2, check=False).returncode == 0:
            commands.append(("rm", CONFIG_KEY))
        commands.append(("set", CONFIG_KEY, model.config))
        for args in commands:
            with self.progress.step(self.etcdctl_line(*args)):
                self.C.etcdctl(*args, api=2)
        if not live:
            with self.progress.step("starting an agent on h1, h2, h3 (the seed: supervisorctl "
                                    "start flannel-21)"):
                self.start_agents()
        with self.progress.step("waiting until every agent sees its two peers on the "
                                f"{model.name} paths"):
            docs = self.wait_paths(model)
        if live:
            for name, agent in self.agents.items():
                if not agent.running or agent.proc.pid != before[name]:
                    raise DemoError(f"the agent on {name} did not survive the live switch:\n"
                                    f"{tail(agent.log())}")
            self.say(f"  Same agent processes as before (pids {' '.join(map(str, before.values()))}"
                     "): switched without a restart.")
        self.show_paths(model, docs)
        self.show_routes(model)
        self.ping_all(model, docs)
        self.throughput(model, docs)
        self.show_counters(model)
        if index == len(self.opts.models):
            self.show_status_command()

    def stop_agents(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.proc.pid, signal.SIGTERM)
        for name, agent in self.agents.items():
            try:  # one SIGTERM each (a second one during shutdown would kill it)
                code: int | None = agent.proc.wait(15)
            except subprocess.TimeoutExpired:
                code = self.C.stop_agent(agent)
            if code not in (0, None):
                raise DemoError(f"the agent on {name} exited with {code} on SIGTERM:\n"
                                f"{tail(agent.log())}")
        self.agents.clear()

    def start_agents(self) -> None:
        for name, _, _ in HOSTS:
            agent = self.C.start_agent(name, wait=False)
            self.agents[name] = agent
            self.pids[agent.proc.pid] = f"agent on {name}"
        for agent in self.agents.values():
            try:
                self.C.wait_ready(agent, timeout=60.0)
            except ClusterError as exc:
                raise DemoError(str(exc)) from None

    def wait_paths(self, model: Model) -> dict[str, dict[str, Any]]:
        """Each agent's /status once it lists both peers with the model's paths."""
        docs: dict[str, dict[str, Any]] = {}
        for name, agent in self.agents.items():
            want = {str(self.host(o).subnet): model.expected_path(self.same_segment(name, o))
                    for o in self.agents if o != name}

            def settled(doc: dict[str, Any], want: dict[str, str] = want) -> bool:
                node = doc["node"]
                got = {p["subnet"]: p["path"] for p in doc["peers"]}
                return bool(node["backend"] == model.backend
                            and node["direct_routing"] == model.direct_routing
                            and got == want)
            try:
                docs[name] = self.C.wait_status(agent, settled, timeout=self.opts.converge + 15,
                                                what=f"peers on paths {want}")
            except ClusterError as exc:
                raise DemoError(f"{name} did not reach the {model.name} paths: "
                                f"{str(exc)[:1500]}") from None
        return docs

    def show_paths(self, model: Model, docs: dict[str, dict[str, Any]]) -> None:
        self.say()
        self.say("  Which path each agent picked per peer (from its /status):")
        rows = []
        for name, doc in docs.items():
            by_subnet = {str(self.host(o).subnet): o for o in self.agents}
            for p in doc["peers"]:
                rows.append([name, f"{by_subnet.get(p['subnet'], '?')} {p['subnet']}",
                             p["public_ip"], p["path"], str(p.get("reason") or "")])
        for line in table(["agent", "peer (container subnet)", "peer host", "path", "why"],
                          rows, indent="    "):
            self.say(line)
        warnings = [(name, w) for name, d in docs.items() for w in d.get("warnings") or []]
        if warnings:
            self.say("  Warnings the agents report (in /status and their log; flannel logs the"
                     " same):")
            for name, w in warnings:
                self.say(f"    {name}: {w}")
        self.say()

    def show_routes(self, model: Model) -> None:
        h1 = self.host("h1")
        res = self.L.ip(h1.ns, "-4", "route", "show", "proto", "157", check=False)
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        self.say("  h1's kernel routes installed by its agent (`ip route show proto 157`; the"
                 " seed looks at `route -n`):")
        for line in lines or ["(none)"]:
            self.say(f"    {line.replace(' proto 157', '').strip()}")
        self.say(f"    ({ROUTE_NOTES[model.name]})")
        self.say()

    def ping_all(self, model: Model, docs: dict[str, dict[str, Any]]) -> None:
        rows = []
        for a, b in PING_PAIRS:
            src, dst = self.host(a), self.host(b)
            assert src.container_ns is not None and dst.container_ip is not None
            path = next((p["path"] for p in docs[a]["peers"]
                         if p["subnet"] == str(dst.subnet)), "?")
            expect_ok = path != "unreachable"
            label = f"{a}c -> {b}c"
            with self.progress.step(f"ping {label} ({src.container_ip} -> {dst.container_ip}),"
                                    f" path {path}, expected to "
                                    f"{'work' if expect_ok else 'fail'}"):
                if expect_ok and not self.L.wait_ping(src.container_ns, dst.container_ip,
                                                      deadline=self.opts.converge):
                    raise DemoError(self.ping_failure(a, b, path))
                count = self.opts.ping_count if expect_ok else 2
                res = self.L.run(src.container_ns, "ping", "-n", "-c", str(count), "-i", "0.2",
                                 "-W", "1", str(dst.container_ip), check=False,
                                 timeout=count * 1.5 + 10)
                rtts = tuple(parse_ping_rtts(res.stdout))
                result = PingResult(model.name, f"{a}c", f"{b}c", path, count, len(rtts), rtts)
                if expect_ok and not rtts:
                    raise DemoError(self.ping_failure(a, b, path))
                if not expect_ok and rtts:
                    raise DemoError(f"{label} answered although {a}'s agent reports the path "
                                    f"as unreachable under {model.name}: the demo cannot "
                                    "explain this, so it stops")
            self.pings.append(result)
            outcome = (f"{result.received}/{result.sent} answered, rtt min/avg/max "
                       f"{rtt_text(rtts)}" if expect_ok else
                       f"no answer, as expected ({b} is not on {a}'s L2 segment)")
            rows.append([label, path, outcome])
        self.say()
        self.say("  Container to container pings:")
        for line in table(["pair", "path", "result"], rows, indent="    "):
            self.say(line)
        self.say()

    def ping_failure(self, a: str, b: str, path: str) -> str:
        lines = [f"{a}'s container cannot ping {b}'s container "
                 f"({self.host(b).container_ip}) over the {path} path within "
                 f"{self.opts.converge:.0f} s."]
        for name in (a, b):
            try:
                warnings = self.C.status(self.agents[name]).get("warnings") or []
            except ClusterError:
                warnings = ["(no /status answer)"]
            lines += [f"  {name} reports: {w}" for w in warnings]
        lines.append(f"  last lines of {b}'s agent log:\n{tail(self.agents[b].log(), 8)}")
        return "\n".join(lines)

    def throughput(self, model: Model, docs: dict[str, dict[str, Any]]) -> None:
        rows = []
        for a, b in TCP_PAIRS:
            src, dst = self.host(a), self.host(b)
            assert src.container_ns is not None
            path = next((p["path"] for p in docs[a]["peers"]
                         if p["subnet"] == str(dst.subnet)), "?")
            if path == "unreachable":
                continue
            label = f"{a}c -> {b}c"
            if not self.has_iperf:
                self.tcp.append(TcpResult(model.name, f"{a}c", f"{b}c", path, None,
                                          "iperf3 not installed"))
                continue
            with self.progress.step(f"iperf3 TCP {label} for {self.opts.tcp_seconds} s "
                                    f"(path {path})"):
                try:
                    run = iperf_tcp(self.L, src.container_ns, str(dst.container_ip), streams=1,
                                    seconds=self.opts.tcp_seconds)
                except TrafficError as exc:
                    raise DemoError(f"iperf3 {label} over {path} failed: {exc}") from None
            self.tcp.append(TcpResult(model.name, f"{a}c", f"{b}c", path, run.gbps))
            rows.append([label, path, rate_text(run.gbps)])
        if rows:
            self.say()
            self.say("  Throughput (one TCP stream, iperf3, both ends in containers):")
            for line in table(["pair", "path", "rate"], rows, indent="    "):
                self.say(line)
        self.say()

    def show_counters(self, model: Model) -> None:
        doc = self.C.status(self.agents["h1"])
        rows = [[p["subnet"], p["path"], f"{p['tx_packets']} / {p['rx_packets']}"]
                for p in doc["peers"]]
        self.say("  h1's tunnel counters per peer (/status; packets through the VXLAN engine"
                 " tx / rx):")
        for line in table(["peer", "path", "tunnelled tx / rx"], rows, indent="    "):
            self.say(line)
        if model.backend == "host-gw" or model.direct_routing:
            self.say("    Direct peers never touch the engine: the kernel forwards their packets,"
                     " so they count 0.")
        self.say()

    def show_status_command(self) -> None:
        h1 = self.host("h1")
        res = self.L.run(h1.ns, sys.executable, "-m", "control.cli", "status", check=False,
                         timeout=30)
        self.say(f"  What an operator sees on h1 with `flannelette status` (ip netns exec "
                 f"{h1.ns} flannelette status):")
        for line in (res.stdout or res.stderr).splitlines():
            self.say("    " + line)
        self.say()

    # ---- the end -----------------------------------------------------------------------
    def summary(self) -> None:
        self.say("=" * 78)
        self.say("Summary")
        self.say("=" * 78)
        rates = {(t.model, t.src, t.dst): t for t in self.tcp}
        rows = []
        for p in self.pings:
            t = rates.get((p.model, p.src, p.dst))
            ping = (f"{p.received}/{p.sent}, avg {sum(p.rtts) / len(p.rtts):.3f} ms"
                    if p.rtts else "no answer (expected)")
            rows.append([p.model, f"{p.src} -> {p.dst}", p.path, ping,
                         rate_text(t.gbps) if t and t.gbps is not None else
                         (t.note if t else "-")])
        for line in table(["model", "pair", "path", "ping", "TCP"], rows, indent="  "):
            self.say(line)
        self.say()
        self.say("  What this showed:")
        self.say("  - host-gw: plain routes, fastest, but only between hosts on one L2 segment"
                 " (h3 unreachable).")
        self.say("  - vxlan: every host reachable through the UDP 8472 tunnel, at the cost of"
                 " encapsulation.")
        self.say("  - vxlan+DirectRouting: the best of both: direct where possible (h1<->h2),"
                 " tunnel elsewhere.")
        self.say("  The config was written with etcdctl's v2 API, as the seed does; flannel and"
                 " flannelette nodes can share it.")
        self.say()

    def state(self) -> dict[str, Any]:
        return {"tag": self.L.tag, "namespaces": list(self.L.namespaces),
                "pids": {str(p): w for p, w in self.pids.items() if pid_alive(p)},
                "dirs": list(self.dirs)}

    def keep(self) -> None:
        """Leave the lab running; write a state file for --cleanup and print how to use it."""
        for proc in list(self.L.procs):  # the iperf3 servers are not needed any more
            if "iperf3" in self.pids.get(proc.pid, ""):
                self.L.stop(proc)
                self.L.procs.remove(proc)
                self.pids.pop(proc.pid, None)
        path = state_path(self.L.tag)
        with open(path, "w") as f:
            json.dump(self.state(), f, indent=1)
        h = self.L.hosts
        self.say("The lab is still running (--keep), with the last model's agents. Try:")
        self.say(f"  ip netns exec {h['h1'].container_ns} ping -c 3 {h['h3'].container_ip}"
                 "      # h1's container -> h3's container")
        self.say(f"  ip netns exec {h['h1'].ns} {sys.executable} -m control.cli status"
                 "   # flannelette status on h1")
        self.say(f"  ip netns exec {h['h1'].ns} ip route                  # h1's routes")
        self.say(f"  ETCDCTL_API=2 ip netns exec {self.L.core} etcdctl --endpoints "
                 f"{self.C.endpoint} ls {PREFIX}/subnets")
        self.say(f"  agent logs: {self.C.workdir}/h1.log (h2.log, h3.log)")
        self.say("Remove it with:")
        self.say(f"  flannelette demo --cleanup {self.L.tag}")
        self.say("or by hand:")
        for pid, what in self.pids.items():
            if pid_alive(pid):  # agents stopped by a restart are gone already
                self.say(f"  kill {pid}    # {what}")
        for ns in reversed(self.L.namespaces):
            self.say(f"  ip netns del {ns}")
        self.say(f"  rm -rf {' '.join(self.dirs)} {path}")

    def teardown(self) -> None:
        """Stop everything this run started and delete what it created; say what is left."""
        if self.cluster is not None:
            self.cluster.close()
        if self.lab is not None:
            tag = self.lab.tag
            self.lab.close()
            left = [ns for ns in list_netns() if ns.startswith(f"fl{tag}-")]
            alive = [pid for pid in self.pids if pid_alive(pid)]
            files = [d for d in self.dirs if d and os.path.exists(d)]
            if left or alive or files:
                self.say(f"cleanup incomplete: namespaces {left}, pids {alive}, dirs {files}; "
                         f"run `flannelette demo --cleanup {tag}`")
            else:
                self.say(f"cleaned up: stopped pids {' '.join(map(str, self.pids))}; removed "
                         f"namespaces fl{tag}-*; removed {' '.join(self.dirs)}")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def list_netns() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def state_path(tag: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"{STATE_PREFIX}{tag}.json")


# ---- --cleanup ----------------------------------------------------------------------------------
def cleanup(tag: str, say: Callable[[str], None]) -> int:
    """Remove a lab left by ``--keep``: its processes (by PID), namespaces and directories."""
    if not re.fullmatch(r"[0-9a-f]{6}", tag):
        say(f"flannelette demo: --cleanup wants the 6-hex-digit lab tag, got {tag!r}")
        return 2
    path = state_path(tag)
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        state = json.load(f)
    namespaces = [ns for ns in list_netns() if ns.startswith(f"fl{tag}-")]
    pids = {int(p) for p in state.get("pids", {})}
    for ns in namespaces:  # whatever still runs inside our namespaces is ours
        res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             check=False)
        pids |= {int(p) for p in res.stdout.split() if p.isdigit()}
    pids = {p for p in pids if pid_alive(p)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = {p for p in pids if pid_alive(p)}
        if not pids:
            break
    for ns in reversed(namespaces):
        subprocess.run(["ip", "netns", "del", ns], check=False)
    dirs = [d for d in state.get("dirs", []) if isinstance(d, str)
            and os.path.basename(d).startswith("flannelette-")]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(path)
    if not namespaces and not state:
        say(f"flannelette demo: nothing found for lab {tag}")
        return 1
    say(f"removed lab {tag}: {len(namespaces)} namespaces, {len(dirs)} directories"
        + (f"; could not stop pids {sorted(pids)}" if pids else ""))
    return 1 if pids else 0


# ---- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flannelette demo",
        description="Walk through flannel's three models (host-gw, vxlan, vxlan+DirectRouting)"
                    " in a namespace lab on this machine (root needed). Everything is removed "
                    "afterwards unless --keep.")
    p.add_argument("--quick", action="store_true",
                   help="fewer pings and 1 s of iperf3 per path (for CI)")
    p.add_argument("--keep", action="store_true",
                   help="leave the lab running at the end and print how to enter and remove it")
    p.add_argument("--cleanup", metavar="TAG",
                   help="remove a lab left by --keep (its tag is printed) and exit")
    p.add_argument("--model", action="append", choices=[m.name for m in MODELS],
                   help="run only this model (repeatable); default: all three in order")
    p.add_argument("--restart", action="store_true",
                   help="switch models as the seed does (stop the agents, replace the config, "
                        "start them) instead of letting the running agents switch live")
    p.add_argument("--break-forwarding", action="store_true",
                   help="for testing the failure path: turn IP forwarding off on h2, so "
                        "pings to h2's container must fail and the demo exits 1")
    return p


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: list[str]) -> int:
    """`flannelette demo [--quick] [--keep] [--cleanup TAG]`; 0 when every step worked."""
    args = build_parser().parse_args(argv)
    out = sys.stdout

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()
    if os.geteuid() != 0:
        say("flannelette demo: needs root (network namespaces, TUN devices, routes)")
        return 1
    if args.cleanup:
        return cleanup(args.cleanup, say)
    missing = [t for t in ("ip", "etcd", "etcdctl", "ping") if shutil.which(t) is None]
    if missing:
        say(f"flannelette demo: missing tools: {', '.join(missing)} (bash scripts/quickstart.sh"
            " setup installs them)")
        return 1
    models = tuple(m for m in MODELS if not args.model or m.name in args.model)
    opts = Options(quick=args.quick, keep=args.keep, break_forwarding=args.break_forwarding,
                   live=not args.restart, models=models)
    demo = Demo(opts, Progress(out, out.isatty()))
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    # Ctrl-C must clean up even when started from a script that ignores SIGINT (`cmd &`).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    kept = False
    t0 = time.monotonic()
    try:
        demo.run()
        code = 0
        if opts.keep:
            demo.keep()
            kept = True
    except DemoError as exc:
        say(f"\nFAILED: {exc}")
        if opts.keep and demo.lab is not None:
            say("(--keep: the lab stays for a look; the commands below remove it)")
            demo.keep()
            kept = True
    except (LabError, EtcdError, ClusterError, TrafficError, subprocess.TimeoutExpired) as exc:
        say(f"\nFAILED: {exc}")
    except Exception as exc:  # a bug in the demo: say so, but still clean up
        say(f"\nFAILED (internal error, please report): {exc!r}\n{traceback.format_exc()}")
    except KeyboardInterrupt:
        say("\ninterrupted (Ctrl-C): cleaning up")
        code = 130
    except Interrupted:
        say("\nterminated (SIGTERM): cleaning up")
        code = 143
    finally:
        # A second Ctrl-C must not leave half a lab behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if not kept:
                demo.teardown()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    say(f"demo {'finished' if code == 0 else 'failed'} in {time.monotonic() - t0:.1f} s "
        f"(exit {code})")
    return code
