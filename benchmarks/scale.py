"""Control-plane scale: N leases in a real etcd, then one agent; how fast, how big.

For each etcd API (v2, v3) and each lease count N, in a fresh lab:

1. a real etcd runs inside the agent's host namespace (on its 127.0.0.1);
2. the network config and N peer leases are written (half of the peers on the
   host's own L2 segment, so DirectRouting gives them direct routes, half behind
   a gateway, so they go through the userspace VXLAN engine);
3. one ``flannelette run`` starts; measured: the time until its /status lists
   exactly those N peers (the engine's table) and the kernel holds a direct
   route for exactly the on-segment ones (the agent hands peers to the engine
   before their routes exist, so /status alone is not "programmed"), and the
   agent's memory (RSS of every process in its session);
4. a burst of 100 changes (50 leases deleted, 50 new ones) is written at once;
   measured: the time until /status and the routes show the new peer set.

Writing leases and polling /status happen inside the namespace through this
module's own small command line (``python -m benchmarks.scale write|wait``),
since etcd and the agent listen on that namespace's loopback.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from benchmarks.etcd import EtcdError, EtcdServer
from benchmarks.lab import Lab, LabError
from benchmarks.traffic import session_cpu

NETWORK = ipaddress.IPv4Network("10.128.0.0/9")
SUBNET_LEN = 24
SEGMENT = "10.10.0.0/16"  # the agent host's segment: on-link peers live here
PREFIX = "/coreos.com/network"
ETCD_PORT = 2379
HEALTHZ_PORT = 9480
BURST = 100
TTL = 86400


class ScaleError(RuntimeError):
    """A scale run could not complete; the message says which step."""


# ---- the synthetic cluster (pure) -----------------------------------------------------
def peer_subnet(i: int) -> ipaddress.IPv4Network:
    """Subnet of synthetic peer ``i``: from the top of the network down, so the agent's own
    allocation (which starts at SubnetMin, the bottom) never collides with one."""
    n_subnets = 1 << (SUBNET_LEN - NETWORK.prefixlen)
    base = int(NETWORK.network_address) + (n_subnets - 1 - i) * (1 << (32 - SUBNET_LEN))
    return ipaddress.IPv4Network((base, SUBNET_LEN))


def peer_public_ip(i: int) -> ipaddress.IPv4Address:
    """Even peers on the agent's segment 10.10.0.0/16 (direct), odd ones on 10.20.0.0/16."""
    j = i // 2
    second = 10 if i % 2 == 0 else 20
    return ipaddress.IPv4Address(f"10.{second}.{1 + j // 200}.{10 + j % 200}")


def peer_mac(i: int, generation: int = 0) -> str:
    """A unique, locally administered unicast VtepMAC per peer (and generation)."""
    octets = (0x0A, generation & 0xFF, *(i.to_bytes(4, "big")))
    return ":".join(f"{b:02x}" for b in octets)


def lease_key(subnet: ipaddress.IPv4Network, prefix: str = PREFIX) -> str:
    return f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def lease_value(i: int) -> str:
    return json.dumps({"PublicIP": str(peer_public_ip(i)), "PublicIPv6": None,
                       "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": peer_mac(i)}},
                      separators=(",", ":"))


def network_config() -> str:
    return json.dumps({"Network": str(NETWORK), "SubnetLen": SUBNET_LEN,
                       "Backend": {"Type": "vxlan", "DirectRouting": True}})


# ---- inside the namespace: write leases, wait for the agent ---------------------------
class _Etcd:
    """Just enough of etcd's v2 and v3 (JSON gateway) HTTP APIs, on one keep-alive
    connection, to write thousands of keys quickly."""

    def __init__(self, endpoint: str, api: str) -> None:
        url = urllib.parse.urlsplit(endpoint)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 2379,
                                               timeout=30)
        self.api = api
        self.lease_id = ""

    def _req(self, method: str, path: str, body: str, ctype: str) -> Any:
        self.conn.request(method, path, body=body, headers={"Content-Type": ctype})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status >= 300 and not (method == "DELETE" and resp.status == 404):
            raise ScaleError(f"etcd {method} {path}: HTTP {resp.status} {data[:200]!r}")
        return json.loads(data) if data else {}

    def _v3(self, path: str, doc: dict[str, Any]) -> Any:
        return self._req("POST", f"/v3/{path}", json.dumps(doc), "application/json")

    @staticmethod
    def _b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    def put(self, key: str, value: str, ttl: int | None) -> None:
        if self.api == "v2":
            form = {"value": value, **({"ttl": str(ttl)} if ttl else {})}
            self._req("PUT", f"/v2/keys{key}", urllib.parse.urlencode(form),
                      "application/x-www-form-urlencoded")
            return
        doc: dict[str, Any] = {"key": self._b64(key), "value": self._b64(value)}
        if ttl:
            if not self.lease_id:
                self.lease_id = str(self._v3("lease/grant", {"TTL": ttl})["ID"])
            doc["lease"] = self.lease_id
        self._v3("kv/put", doc)

    def delete(self, key: str) -> None:
        if self.api == "v2":
            self._req("DELETE", f"/v2/keys{key}", "", "text/plain")
        else:
            self._v3("kv/deleterange", {"key": self._b64(key)})


def _write_main(a: argparse.Namespace) -> int:
    db = _Etcd(a.endpoint, a.api)
    if a.config:
        db.put(f"{PREFIX}/config", network_config(), None)
    for i in range(a.delete_from, a.delete_to):
        db.delete(lease_key(peer_subnet(i)))
    for i in range(a.put_from, a.put_to):
        db.put(lease_key(peer_subnet(i)), lease_value(i), TTL)
    print(json.dumps({"done_at": time.monotonic()}), flush=True)
    return 0


def _status_subnets(url: str) -> set[str] | None:
    try:
        conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=5)
        conn.request("GET", "/status")
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return {str(p.get("subnet")) for p in doc.get("peers") or []}


def parse_proc_net_route(text: str) -> set[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]]:
    """(destination, gateway) of every gatewayed route in /proc/net/route's text
    (the main table of the reading process's namespace; fields are little-endian hex)."""
    def addr(h: str) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(h), "little"))

    out = set()
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8 or f[2] == "00000000":
            continue
        mask = bin(int(addr(f[7]))).count("1")
        out.add((ipaddress.IPv4Network(f"{addr(f[1])}/{mask}"), addr(f[2])))
    return out


def direct_subnets(text: str) -> set[str]:
    """Synthetic peer subnets that have a route via an address on the agent's segment."""
    seg = ipaddress.IPv4Network(SEGMENT)
    return {str(net) for net, gw in parse_proc_net_route(text)
            if gw in seg and net.subnet_of(NETWORK)}


def _wait_main(a: argparse.Namespace) -> int:
    """Until /status lists the peers [first, last) and the kernel holds a direct route
    for exactly the on-segment ones among them: "programmed (routes + engine)"."""
    want = {str(peer_subnet(i)) for i in range(a.first, a.last)}
    want_direct = {str(peer_subnet(i)) for i in range(a.first, a.last) if i % 2 == 0}
    end = time.monotonic() + a.timeout
    polls = 0
    seen: set[str] | None = None
    direct: set[str] = set()
    while time.monotonic() < end:
        polls += 1
        seen = _status_subnets(a.status)
        if seen is not None and seen == want:
            with open("/proc/net/route") as f:
                direct = direct_subnets(f.read())
            if direct == want_direct:
                print(json.dumps({"done_at": time.monotonic(), "polls": polls}), flush=True)
                return 0
        time.sleep(a.interval)
    print(json.dumps({"done_at": None, "polls": polls,
                      "status_peers": len(seen) if seen is not None else None,
                      "status_missing": len(want - seen) if seen is not None else None,
                      "direct_routes": len(direct), "direct_expected": len(want_direct)}),
          flush=True)
    return 1


def _inner_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write config/leases into etcd")
    w.add_argument("--endpoint", required=True)
    w.add_argument("--api", choices=("v2", "v3"), required=True)
    w.add_argument("--config", action="store_true")
    w.add_argument("--put-from", type=int, default=0)
    w.add_argument("--put-to", type=int, default=0)
    w.add_argument("--delete-from", type=int, default=0)
    w.add_argument("--delete-to", type=int, default=0)
    q = sub.add_parser("wait", help="poll the agent's /status until it lists the peer set")
    q.add_argument("--status", required=True)
    q.add_argument("--first", type=int, required=True)
    q.add_argument("--last", type=int, required=True)
    q.add_argument("--timeout", type=float, default=300.0)
    q.add_argument("--interval", type=float, default=0.05)
    a = p.parse_args(argv)
    return _write_main(a) if a.cmd == "write" else _wait_main(a)


# ---- the outer driver -----------------------------------------------------------------
def session_rss(session: int) -> int:
    """Resident memory (bytes) of every live process in ``session``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[3]) != session:
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def _inner(lab: Lab, ns: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run this module's inner command line inside ``ns``; its one-line JSON answer."""
    res = lab.run(ns, sys.executable, "-m", "benchmarks.scale", *args, check=False,
                  timeout=timeout + 30)
    try:
        doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise ScaleError(f"scale {args[0]} failed: {res.stderr.strip()[-300:]}") from e
    if res.returncode != 0:
        raise ScaleError(f"scale {args[0]} gave up: {doc}")
    return doc


def agent_argv(api: str, endpoint: str, host_ip: str, run_dir: str) -> list[str]:
    """`flannelette run` for the scale host (flanneld's flags)."""
    return [sys.executable, "-m", "control.cli", "run", "--etcd-endpoints", endpoint,
            "--etcd-prefix", PREFIX, "--etcd-api", api, "--iface", "eth0",
            "--public-ip", host_ip, "--subnet-file", os.path.join(run_dir, "subnet.env"),
            "--healthz-ip", "127.0.0.1", "--healthz-port", str(HEALTHZ_PORT)]


def measure(api: str, n: int, *, log: Callable[[str], None], timeout: float = 300.0,
            log_dir: str = "") -> dict[str, Any]:
    """One agent against ``n`` leases written with etcd API ``api``, in a fresh lab."""
    out: dict[str, Any] = {"api": api, "leases": n}
    status = f"http://127.0.0.1:{HEALTHZ_PORT}"
    try:
        with Lab() as lab, tempfile.TemporaryDirectory(prefix="flannelette-scale-") as tmp:
            lab.add_segment("S", SEGMENT)
            host = lab.add_host("agent", "S")
            etcd = EtcdServer(host="127.0.0.1", netns=host.ns)
            agent: subprocess.Popen[Any] | None = None
            try:
                etcd.start()
                t = time.monotonic()
                _inner(lab, host.ns, "write", "--endpoint", etcd.endpoint, "--api", api,
                       "--config", "--put-from", "0", "--put-to", str(n), timeout=timeout)
                out["write_s"] = time.monotonic() - t
                log(f"  scale {api}/{n}: {n} leases written in {out['write_s']:.1f} s")
                logf = os.path.join(log_dir or tmp, f"scale-{api}-{n}-agent.log")
                os.makedirs(os.path.dirname(logf), exist_ok=True)
                with open(logf, "ab") as lf:
                    t0 = time.monotonic()
                    agent = lab.popen(host.ns, *agent_argv(api, etcd.endpoint, str(host.ip),
                                                           tmp), stdout=lf,
                                      stderr=subprocess.STDOUT)
                got = _inner(lab, host.ns, "wait", "--status", status, "--first", "0",
                             "--last", str(n), "--timeout", str(timeout), timeout=timeout)
                out["programmed_s"] = float(got["done_at"]) - t0
                out["direct_routes_expected"] = (n + 1) // 2
                out["direct_routes_found"] = direct_routes(lab, host.ns)
                if out["direct_routes_found"] != out["direct_routes_expected"]:
                    raise ScaleError(f"/status listed every peer but the kernel has "
                                     f"{out['direct_routes_found']} direct routes, not "
                                     f"{out['direct_routes_expected']}")
                out["rss_bytes"] = session_rss(agent.pid)
                out["cpu_s_startup"] = session_cpu([agent.pid]).total
                log(f"  scale {api}/{n}: all peers programmed after "
                    f"{out['programmed_s']:.2f} s, RSS {out['rss_bytes'] / 2**20:.1f} MiB")
                half = BURST // 2
                t1 = time.monotonic()
                wrote = _inner(lab, host.ns, "write", "--endpoint", etcd.endpoint, "--api", api,
                               "--delete-from", "0", "--delete-to", str(half), "--put-from",
                               str(n), "--put-to", str(n + half), timeout=timeout)
                got = _inner(lab, host.ns, "wait", "--status", status, "--first", str(half),
                             "--last", str(n + half), "--timeout", str(timeout),
                             timeout=timeout)
                out["burst_write_s"] = float(wrote["done_at"]) - t1
                out["burst_s"] = float(got["done_at"]) - t1
                out["rss_after_burst_bytes"] = session_rss(agent.pid)
                found = direct_routes(lab, host.ns)
                if found != out["direct_routes_expected"]:
                    raise ScaleError(f"after the burst the kernel has {found} direct routes, "
                                     f"not {out['direct_routes_expected']}")
                log(f"  scale {api}/{n}: burst of {BURST} changes applied after "
                    f"{out['burst_s']:.2f} s")
                if agent.poll() is not None:
                    raise ScaleError(f"agent exited with {agent.returncode}")
            finally:
                if agent is not None:  # before etcd, so it does not log etcd going away
                    lab.stop(agent)
                etcd.stop()
    except (ScaleError, EtcdError, LabError, subprocess.TimeoutExpired, OSError) as e:
        out.update(status="failed", reason=str(e))
        log(f"  scale {api}/{n}: failed: {e}")
        return out
    out["status"] = "ok"
    return out


def direct_routes(lab: Lab, ns: str) -> int:
    """How many synthetic peer subnets have a direct route in ``ns`` (read in ``ns``)."""
    return len(direct_subnets(lab.run(ns, "cat", "/proc/net/route").stdout))


def agent_available() -> str | None:
    """Why the scale part cannot run yet, or None."""
    if importlib.util.find_spec("control.agent") is None:
        return "control.agent (flannelette run) is not in the tree yet"
    return None


def run(leases: str, *, quick: bool, log: Callable[[str], None],
        apis: Iterable[str] = ("v2", "v3"), log_dir: str = "") -> dict[str, Any]:
    """Measure each API at each lease count; the result goes into the bench JSON."""
    counts = [int(x) for x in leases.split(",") if x.strip()] if leases else (
        [200] if quick else [1000, 5000])
    why = agent_available()
    if why is not None:
        return {"status": "not_done", "reason": why, "counts": counts}
    runs = []
    for api in apis:
        for n in counts:
            log(f"== scale: {api}, {n} leases")
            runs.append(measure(api, n, log=log, timeout=120.0 if quick else 600.0,
                                log_dir=log_dir))
    ok = any(r.get("status") == "ok" for r in runs)
    return {"status": "ok" if ok else "failed",
            "reason": "" if ok else "no scale run completed", "counts": counts, "runs": runs,
            "burst": BURST}


if __name__ == "__main__":
    sys.exit(_inner_main(sys.argv[1:]))
