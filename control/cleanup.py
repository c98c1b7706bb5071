"""``flannelette cleanup``: remove every route, rule and device this node installed.

The agent leaves its routes in place on SIGTERM (a restart must not cut
traffic); this command is how an operator takes a node out for good. It finds
our routes by their rtnetlink protocol tag (157), our masquerade rules by their
nft table / iptables chain names, and deletes the TUN device if one is named
(for ``flannel.<VNI>`` also the tunnel-GSO TAP ``fltx.<VNI>`` and its FORWARD rule).
Running it twice is harmless.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from control import masq, netlink
from control.routes import remove_all_routes
from dataplane.txtap import remove_forward_rule


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flannelette cleanup",
        description="Remove the routes (protocol 157), masquerade rules and TUN device "
                    "a flannelette node installed.")
    p.add_argument("--tun-name", action="append", default=[], metavar="NAME",
                   help="also delete this TUN device if it exists (repeatable)")
    p.add_argument("--table", type=int, default=netlink.MAIN_TABLE,
                   help="routing table our routes are in (default: %(default)s, main)")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    failures: list[str] = []
    try:
        for r in remove_all_routes(netlink.RT_PROTO, args.table):
            print(f"removed route {r}")
    except Exception as e:  # report each failure by name, never a traceback
        failures.append(f"routes: {e}")
    try:
        for what in masq.remove():
            print(f"removed {what}")
    except Exception as e:  # report each failure by name, never a traceback
        failures.append(f"masquerade rules: {e}")
    for name in args.tun_name:
        try:
            if netlink.delete_link(name):
                print(f"removed device {name}")
            tap = "fltx." + name.rsplit(".", 1)[-1] if name.startswith("flannel.") else ""
            if tap and netlink.delete_link(tap):
                print(f"removed device {tap}")
            if tap and remove_forward_rule(tap):
                print(f"removed the iptables FORWARD rule for {tap}")
        except Exception as e:  # report each failure by name, never a traceback
            failures.append(f"device {name}: {e}")
    for f in failures:
        print(f"flannelette cleanup: {f}", file=sys.stderr)
    return 1 if failures else 0
