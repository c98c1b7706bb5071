"""A kernel VXLAN device set up exactly the way flannel sets up ``flannel.<VNI>``.

The reference peer for interop tests and the "kernel VXLAN" anchor of the
benchmarks. Same commands flannel's vxlan backend issues through netlink::

    ip link add flannel.1 type vxlan id 1 local <public ip> dev eth0 dstport 8472 nolearning
    ip link set flannel.1 mtu <eth0 mtu - 50>; ip addr add <subnet net>/32 dev flannel.1; up
    per peer: ip neigh replace <peer net> lladdr <peer mac> dev flannel.1 nud permanent
              bridge fdb replace <peer mac> dev flannel.1 dst <peer public ip> self permanent
              ip route replace <peer subnet> via <peer net> dev flannel.1 onlink

Offloads keep their defaults (never turned off to make a test pass).

Usage::

    kv = KernelVxlan.create(ns, subnet="10.244.2.0/24", public_ip="10.10.1.2")
    kv.add_peer("10.244.1.0/24", "10.10.1.1", "0a:..:01")                 # static neighbour
    kv.add_peer("10.244.1.0/24", "10.10.1.1", mac, static_neighbour=False)  # ARP over tunnel
    kv.remove_peer("10.244.1.0/24", "10.10.1.1", mac)
    kv.delete()
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

ZERO_MAC = "00:00:00:00:00:00"


class KernelVxlanError(RuntimeError):
    """An ip/bridge command failed; the message names the namespace and command."""


def _run(ns: str, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [argv[0], "-n", ns, *argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise KernelVxlanError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class KernelVxlan:
    """One flannel-style kernel VXLAN device inside namespace ``ns``."""

    ns: str
    name: str
    vni: int
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    mac: str  # lower case, colons: what this node would publish as VtepMAC
    mtu: int
    port: int = 8472

    @classmethod
    def create(cls, ns: str, subnet: str, public_ip: str, vni: int = 1, dev: str = "eth0",
               port: int = 8472, mtu: int | None = None, name: str | None = None,
               mac: str | None = None) -> KernelVxlan:
        """Create and bring up the device; MTU defaults to ``dev``'s MTU - 50."""
        name = name or f"flannel.{vni}"
        if mtu is None:
            link = json.loads(_run(ns, ["ip", "-j", "link", "show", "dev", dev]).stdout)
            mtu = int(link[0]["mtu"]) - 50
        add = ["ip", "link", "add", name]
        if mac is not None:
            add += ["address", mac]
        _run(ns, [*add, "type", "vxlan", "id", str(vni), "local", public_ip, "dev", dev,
                  "dstport", str(port), "nolearning"])
        net = ipaddress.IPv4Network(subnet)
        _run(ns, ["ip", "link", "set", "dev", name, "mtu", str(mtu)])
        _run(ns, ["ip", "addr", "add", f"{net.network_address}/32", "dev", name])
        _run(ns, ["ip", "link", "set", "dev", name, "up"])
        link = json.loads(_run(ns, ["ip", "-j", "link", "show", "dev", name]).stdout)
        return cls(ns, name, vni, net, ipaddress.IPv4Address(public_ip),
                   str(link[0]["address"]).lower(), mtu, port)

    def add_peer(self, subnet: str, public_ip: str, mac: str,
                 static_neighbour: bool = True) -> None:
        """Install a peer as flannel does (neighbour, FDB, onlink route), replace semantics.

        Without ``static_neighbour`` the kernel must resolve the peer's VTEP
        address by ARP over the tunnel: an all-zeros FDB entry towards the peer
        carries the broadcast request there.
        """
        net = ipaddress.IPv4Network(subnet)
        gw = str(net.network_address)
        if static_neighbour:
            _run(self.ns, ["ip", "neigh", "replace", gw, "lladdr", mac, "dev", self.name,
                           "nud", "permanent"])
        else:
            _run(self.ns, ["bridge", "fdb", "append", ZERO_MAC, "dev", self.name, "dst",
                           public_ip, "self", "permanent"])
        _run(self.ns, ["bridge", "fdb", "replace", mac, "dev", self.name, "dst", public_ip,
                       "self", "permanent"])
        _run(self.ns, ["ip", "route", "replace", str(net), "via", gw, "dev", self.name,
                       "onlink"])

    def remove_peer(self, subnet: str, public_ip: str, mac: str) -> None:
        """Delete what add_peer installed (missing pieces are fine)."""
        net = ipaddress.IPv4Network(subnet)
        gw = str(net.network_address)
        _run(self.ns, ["ip", "route", "del", str(net), "via", gw, "dev", self.name, "onlink"],
             check=False)
        _run(self.ns, ["bridge", "fdb", "del", mac, "dev", self.name, "dst", public_ip, "self"],
             check=False)
        _run(self.ns, ["bridge", "fdb", "del", ZERO_MAC, "dev", self.name, "dst", public_ip,
                       "self"], check=False)
        _run(self.ns, ["ip", "neigh", "del", gw, "dev", self.name], check=False)

    def delete(self) -> None:
        """Remove the device (deleting the namespace does this too)."""
        _run(self.ns, ["ip", "link", "del", "dev", self.name], check=False)
