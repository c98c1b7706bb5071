"""--ip-masq in the lab: leaving the Network is masqueraded, overlay traffic keeps its source.

h1 and h2 share segment A, each with a container; an "outside" namespace stands
for the world beyond the overlay. h1 and h2 route each other's container
subnets with plain host-gw routes. A small UDP listener records the source
address it sees. Run once with nftables and once with iptables.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from benchmarks.lab import Host, Lab

pytestmark = pytest.mark.netns

NETWORK = "10.244.0.0/16"
PORT = 9999

LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(20)
print("ready", flush=True)
data, (ip, port) = s.recvfrom(100)
print(ip, flush=True)
"""

SEND = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(25):
    try:
        s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass
    time.sleep(0.2)
"""

MASQ = r"""
import ipaddress, json, sys
from control import masq
req = json.loads(sys.argv[1])
rules = (masq.masq_rules(ipaddress.IPv4Network(req["network"]), ipaddress.IPv4Network(req["own"]))
         + masq.forward_rules(ipaddress.IPv4Network(req["network"])))
print(masq.install(rules, req["tool"]))
"""


def install_masq(lab: Lab, host: Host, tool: str) -> None:
    req = f'{{"network": "{NETWORK}", "own": "{host.subnet}", "tool": "{tool}"}}'
    proc = lab.run(host.ns, sys.executable, "-c", MASQ, req, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == tool


def seen_source(lab: Lab, listen_ns: str, listen_ip: ipaddress.IPv4Address, send_ns: str
                ) -> str:
    """Start a listener, send until it hears one datagram, return the source it saw."""
    listener = lab.popen(listen_ns, sys.executable, "-c", LISTEN, str(listen_ip), str(PORT),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    sender = lab.popen(send_ns, sys.executable, "-c", SEND, str(listen_ip), str(PORT))
    try:
        src: str = listener.stdout.readline().strip()  # bounded by the listener's 20 s timeout
    finally:
        lab.stop(sender)
        lab.stop(listener)
    assert src, "the listener heard nothing"
    return src


def nat_rule_dump(lab: Lab, host: Host, tool: str) -> str:
    if tool == "nft":
        return lab.run(host.ns, "nft", "list", "table", "ip", "flannelette").stdout
    return lab.run(host.ns, "iptables", "-w", "-t", "nat", "-S").stdout


@pytest.mark.parametrize("tool", ["nft", "iptables"])
def test_ip_masq_outside_sees_host_overlay_keeps_source(lab: Lab, tool: str) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.244.1.0/24")
    h2 = lab.add_host("h2", "A", "10.244.2.0/24")
    out_ns, out_ip = lab.add_outside("out", "10.99.0.0/24")
    assert h1.container_ns and h2.container_ns and h1.container_ip and h2.container_ip
    # Plain host-gw routes between the two hosts.
    lab.ip(h1.ns, "route", "add", str(h2.subnet), "via", str(h2.ip))
    lab.ip(h2.ns, "route", "add", str(h1.subnet), "via", str(h1.ip))
    # Control: without the rules the outside sees the container's own address.
    assert seen_source(lab, out_ns, out_ip, h1.container_ns) == str(h1.container_ip)
    install_masq(lab, h1, tool)
    install_masq(lab, h2, tool)
    before = nat_rule_dump(lab, h1, tool)
    install_masq(lab, h1, tool)  # idempotent: the same rules, once
    assert nat_rule_dump(lab, h1, tool) == before
    assert "fully-random" in before or "--random-fully" in before
    if tool == "iptables":
        assert before.count("-A POSTROUTING -m comment --comment \"flannelette masq\"") == 1

    # A container reaching the outside is seen there with its host's address.
    assert seen_source(lab, out_ns, out_ip, h1.container_ns) == str(h1.ip)
    # Container to container across hosts keeps the container's address.
    assert seen_source(lab, h2.container_ns, h2.container_ip, h1.container_ns) == str(
        h1.container_ip)
    assert seen_source(lab, h1.container_ns, h1.container_ip, h2.container_ns) == str(
        h2.container_ip)


