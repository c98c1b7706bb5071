"""Which interface carries the overlay: flanneld's --iface / --public-ip rules.

``--iface`` names an interface or one of its addresses (repeatable: first
that exists wins); without it, the interface of the default route. The
overlay MTU derives from that interface's MTU. Synchronous pyroute2 (one short
IPRoute session); the agent calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from control.errors import FlagError


@dataclass(frozen=True, slots=True)
class ExternalInterface:
    """The external interface: name, the IPv4 address used as PublicIP, MTU."""

    name: str
    address: ipaddress.IPv4Address
    mtu: int


def _snapshot() -> tuple[dict[int, tuple[str, int]], dict[int, list[ipaddress.IPv4Address]],
                         int | None]:
    with IPRoute() as ipr:
        links = {int(m["index"]): (str(m.get("IFLA_IFNAME")), int(m.get("IFLA_MTU") or 1500))
                 for m in ipr.get_links()}
        addrs: dict[int, list[ipaddress.IPv4Address]] = {}
        for m in ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(int(m["index"]), []).append(
                ipaddress.IPv4Address(m.get("IFA_ADDRESS")))
        default: Any = None
        for r in ipr.route("dump", family=socket.AF_INET, table=254):
            if int(r["dst_len"]) == 0 and r.get("RTA_OIF") is not None:
                default = int(r.get("RTA_OIF"))
                break
    return links, addrs, default


def find_interface(specs: Sequence[str]) -> ExternalInterface:
    """Resolve --iface values (names or addresses); FlagError naming what was not found."""
    links, addrs, default = _snapshot()
    by_name = {name: idx for idx, (name, _) in links.items()}
    for spec in specs:
        try:
            want = ipaddress.IPv4Address(spec)
        except ValueError:
            idx = by_name.get(spec)
            if idx is None or not addrs.get(idx):
                continue
            return ExternalInterface(spec, addrs[idx][0], links[idx][1])
        for idx, found in addrs.items():
            if want in found:
                return ExternalInterface(links[idx][0], want, links[idx][1])
    if specs:
        raise FlagError(f"--iface {', '.join(specs)}: no such interface with an IPv4 "
                        f"address (have: {', '.join(sorted(by_name))})")
    if default is None or not addrs.get(default):
        raise FlagError("no default route to pick the external interface from; "
                        "name it with --iface")
    return ExternalInterface(links[default][0], addrs[default][0], links[default][1])
