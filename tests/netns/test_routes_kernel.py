"""RouteProgrammer against a real kernel: h1, h2 on segment A, h3 on segment B behind a router.

pyroute2 acts in the namespace of the process that calls it, so each step runs a
fresh Python process inside h1's namespace (``DRIVER`` below) that builds a
RouteProgrammer, does one thing and prints JSON. A fresh process per step is
also exactly what an agent restart looks like.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from benchmarks.lab import Host, Lab

pytestmark = pytest.mark.netns

NETWORK = "10.244.0.0/16"
TUN = "fltun0"
MAC2, MAC3 = "0a0000000002", "0a0000000003"

DRIVER = r"""
import asyncio, ipaddress, json, logging, sys
from control import netlink
from control import reconcile as rc
from control.routes import RouteProgrammer
from dataplane.fib import Peer

logs = []
class H(logging.Handler):
    def emit(self, record): logs.append(record.getMessage())
logging.getLogger("flannelette").addHandler(H())
logging.getLogger("flannelette").setLevel(logging.DEBUG)

req = json.loads(sys.argv[1])
peers = [Peer(ipaddress.IPv4Network(s), ipaddress.IPv4Address(ip),
              bytes.fromhex(mac) if mac else None) for s, ip, mac in req.get("peers", [])]

def out(prog, **extra):
    d = {"peers": {str(p.subnet): p.path.value for p in prog.peers},
         "warnings": list(prog.warnings), "routes": [str(r) for r in prog.routes],
         "status": prog.status(), "logs": list(logs)}
    d.update(extra)
    print(json.dumps(d), flush=True)

async def main():
    prog = RouteProgrammer(device=req.get("device"), network=ipaddress.IPv4Network(req["network"]),
                           own_subnet=ipaddress.IPv4Network(req["own"]))
    op = req["op"]
    if op == "reach":
        got = await netlink.aroute_get(ipaddress.IPv4Address(a) for a in req["addrs"])
        r = {str(a): [rc.reachability(l).same_l2, rc.reachability(l).detail]
             for a, l in got.items()}
        print(json.dumps(r))
        return
    adopted = []
    if req.get("adopt"):
        adopted = [str(r) for r in await prog.adopt()]
    if op == "sync":
        await prog.sync(req["backend"], req["dr"], peers)
        out(prog, adopted=adopted)
    elif op == "adopt":
        out(prog, adopted=adopted)
    elif op == "watch":
        await prog.sync(req["backend"], req["dr"], peers)
        out(prog)
        def on_peers(ps):
            out(prog)
        try:
            await asyncio.wait_for(prog.watch(on_peers, debounce=0.2), req["seconds"])
        except asyncio.TimeoutError:
            pass
asyncio.run(main())
"""


def drive(lab: Lab, host: Host, **req: Any) -> dict[str, Any]:
    req.setdefault("network", NETWORK)
    req.setdefault("own", str(host.subnet))
    proc = lab.run(host.ns, sys.executable, "-c", DRIVER, json.dumps(req), check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def our_routes(lab: Lab, host: Host) -> list[str]:
    out = lab.ip(host.ns, "-4", "route", "show", "proto", "157").stdout
    # "linkdown": nobody holds the test's TUN open, which routing does not care about.
    return sorted(" ".join(w for w in line.split() if w != "linkdown")
                  for line in out.splitlines() if line.strip())


def three_hosts(lab: Lab) -> tuple[Host, Host, Host]:
    lab.add_segment("A", "10.10.1.0/24")
    lab.add_segment("B", "10.10.2.0/24")
    return (lab.add_host("h1", "A", "10.244.1.0/24"), lab.add_host("h2", "A", "10.244.2.0/24"),
            lab.add_host("h3", "B", "10.244.3.0/24"))


def peers_of(*hosts: Host, macs: tuple[str | None, ...] = (MAC2, MAC3)) -> list[list[Any]]:
    return [[str(h.subnet), str(h.ip), mac] for h, mac in zip(hosts, macs, strict=False)]


def add_tun(lab: Lab, host: Host) -> None:
    lab.ip(host.ns, "tuntap", "add", "dev", TUN, "mode", "tun")
    lab.ip(host.ns, "link", "set", TUN, "up")


def test_route_get_tells_same_l2_from_routed(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    r = drive(lab, h1, op="reach", addrs=[str(h2.ip), str(h3.ip)])
    assert r[str(h2.ip)][0] is True
    assert r[str(h3.ip)][0] is False and "10.10.1.254" in r[str(h3.ip)][1]


def test_host_gw_routes_same_segment_and_warns_about_the_other(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    r = drive(lab, h1, op="sync", backend="host-gw", dr=False, peers=peers_of(h2, h3))
    assert r["peers"] == {str(h2.subnet): "direct", str(h3.subnet): "unreachable"}
    (w,) = r["warnings"]
    assert str(h3.subnet) in w and str(h3.ip) in w and "not on our L2 segment" in w
    assert our_routes(lab, h1) == [f"{h2.subnet} via {h2.ip} dev eth0"]
    assert any("-> direct" in line for line in r["logs"])
    # Real traffic: h2 routes back the same way, containers reach each other.
    r2 = drive(lab, h2, op="sync", backend="host-gw", dr=False, peers=peers_of(h1))
    assert r2["peers"] == {str(h1.subnet): "direct"}
    assert h1.container_ns is not None and h2.container_ip is not None
    assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=10)
    # h3's subnet has no route: the lookup goes out of the default route, not to a peer.
    got = lab.ip(h1.ns, "route", "get", "10.244.3.2").stdout
    assert "via 10.10.1.254" in got


def test_vxlan_direct_routing_splits_peers_and_tunnels_the_rest(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    add_tun(lab, h1)
    r = drive(lab, h1, op="sync", backend="VxLAN", dr=True, device=TUN, peers=peers_of(h2, h3))
    assert r["peers"] == {str(h2.subnet): "direct", str(h3.subnet): "vxlan"}
    assert r["warnings"] == []
    assert our_routes(lab, h1) == [f"{NETWORK} dev {TUN} scope link",
                                   f"{h2.subnet} via {h2.ip} dev eth0"]
    assert f"via {h2.ip} dev eth0" in lab.ip(h1.ns, "route", "get", "10.244.2.2").stdout
    assert f"dev {TUN}" in lab.ip(h1.ns, "route", "get", "10.244.3.2").stdout
    # A subnet nobody leased goes into the engine (which drops it), not out to the world.
    assert f"dev {TUN}" in lab.ip(h1.ns, "route", "get", "10.244.77.2").stdout
    # The own subnet stays on cni0.
    assert "dev cni0" in lab.ip(h1.ns, "route", "get", "10.244.1.2").stdout
    status = {row["subnet"]: row for row in r["status"]}
    assert status[str(h3.subnet)]["path"] == "vxlan" and "10.10.1.254" in status[
        str(h3.subnet)]["reason"]


def test_changes_and_removals_leave_no_stale_routes(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    add_tun(lab, h1)
    base = dict(device=TUN)
    drive(lab, h1, op="sync", backend="vxlan", dr=True, peers=peers_of(h2, h3), **base)
    # h2's PublicIP changes (a second address on the same segment): one replace.
    lab.ip(h2.ns, "addr", "add", "10.10.1.20/24", "dev", "eth0")
    moved = [[str(h2.subnet), "10.10.1.20", MAC2], [str(h3.subnet), str(h3.ip), MAC3]]
    r = drive(lab, h1, op="sync", backend="vxlan", dr=True, peers=moved, **base)
    assert our_routes(lab, h1) == [f"{NETWORK} dev {TUN} scope link",
                                   f"{h2.subnet} via 10.10.1.20 dev eth0"]
    assert any(line.startswith("route replace") for line in r["logs"])
    assert not any(line.startswith("route delete") for line in r["logs"])
    # h2 goes away: its route goes with it.
    drive(lab, h1, op="sync", backend="vxlan", dr=True, peers=moved[1:], **base)
    assert our_routes(lab, h1) == [f"{NETWORK} dev {TUN} scope link"]
    # Backend switches: host-gw drops the TUN route, plain vxlan has no direct routes.
    r = drive(lab, h1, op="sync", backend="host-gw", dr=False, peers=peers_of(h2, h3), **base)
    assert our_routes(lab, h1) == [f"{h2.subnet} via {h2.ip} dev eth0"]
    assert r["peers"][str(h3.subnet)] == "unreachable"
    r = drive(lab, h1, op="sync", backend="vxlan", dr=False, peers=peers_of(h2, h3), **base)
    assert our_routes(lab, h1) == [f"{NETWORK} dev {TUN} scope link"]
    assert set(r["peers"].values()) == {"vxlan"}
    # The same sync again changes nothing in the kernel.
    r = drive(lab, h1, op="sync", backend="vxlan", dr=False, peers=peers_of(h2, h3), **base)
    assert not any(line.startswith("route ") for line in r["logs"])


def test_restart_adopts_wanted_routes_and_removes_foreign_leftovers(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    drive(lab, h1, op="sync", backend="host-gw", dr=False, peers=peers_of(h2, h3))
    # Left over from a run with another Network, and one into our own subnet: not ours now.
    lab.ip(h1.ns, "route", "add", "10.77.0.0/24", "via", str(h2.ip), "proto", "157")
    lab.ip(h1.ns, "route", "add", "10.244.1.128/25", "via", str(h2.ip), "proto", "157")
    r = drive(lab, h1, op="sync", adopt=True, backend="host-gw", dr=False,
              peers=peers_of(h2, h3))
    assert r["adopted"] == [f"{h2.subnet} via {h2.ip} dev eth0"]
    assert our_routes(lab, h1) == [f"{h2.subnet} via {h2.ip} dev eth0"]
    # The wanted route was left alone (no replace), so traffic never saw a gap.
    assert not any(line.startswith("route ") for line in r["logs"])
    assert sum("removed route left by an earlier run" in line for line in r["logs"]) == 2


def test_own_route_change_triggers_reevaluation(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    add_tun(lab, h1)
    req = dict(op="watch", backend="vxlan", dr=True, device=TUN, peers=peers_of(h2, h3),
               seconds=25, network=NETWORK, own=str(h1.subnet))
    proc = lab.popen(h1.ns, sys.executable, "-c", DRIVER, json.dumps(req),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert first["peers"][str(h2.subnet)] == "direct"
    # watch() re-evaluates once right after subscribing: from then on we are heard.
    subscribed = json.loads(proc.stdout.readline())
    assert subscribed["peers"][str(h2.subnet)] == "direct"
    # Someone (not us) routes h2's PublicIP via the router: h2 is no longer "same L2".
    lab.ip(h1.ns, "route", "add", f"{h2.ip}/32", "via", "10.10.1.254")
    deadline = time.monotonic() + 15
    seen = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen = json.loads(line)
        if seen["peers"][str(h2.subnet)] == "vxlan":
            break
    lab.stop(proc)
    assert seen is not None and seen["peers"][str(h2.subnet)] == "vxlan", seen
    assert any("direct -> vxlan" in line for line in seen["logs"])
    assert our_routes(lab, h1) == [f"{NETWORK} dev {TUN} scope link"]


def test_ip_forward_off_is_reported(lab: Lab) -> None:
    h1, h2, _h3 = three_hosts(lab)
    r = drive(lab, h1, op="sync", backend="host-gw", dr=False, peers=peers_of(h2))
    assert r["warnings"] == []
    lab.sysctl(h1.ns, "net.ipv4.ip_forward", "0")
    r = drive(lab, h1, op="sync", backend="host-gw", dr=False, peers=peers_of(h2))
    assert any("ip_forward is 0" in w for w in r["warnings"])
    assert any("ip_forward is 0" in line for line in r["logs"])


