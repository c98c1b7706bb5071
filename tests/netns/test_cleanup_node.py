"""`flannelette cleanup` removes our routes, our masquerade rules (nft and iptables) and the TUN."""

from __future__ import annotations

import sys

import pytest

from benchmarks.lab import Lab
from tests.netns.test_masq_traffic import install_masq
from tests.netns.test_routes_kernel import TUN, add_tun, drive, our_routes, peers_of, three_hosts

pytestmark = pytest.mark.netns


def test_cleanup_removes_everything_we_installed_and_only_that(lab: Lab) -> None:
    h1, h2, h3 = three_hosts(lab)
    add_tun(lab, h1)
    drive(lab, h1, op="sync", backend="vxlan", dr=True, device=TUN, peers=peers_of(h2, h3))
    assert len(our_routes(lab, h1)) == 2
    install_masq(lab, h1, "nft")
    install_masq(lab, h1, "iptables")
    # Someone else's route, rule and table must survive.
    lab.ip(h1.ns, "route", "add", "10.55.0.0/24", "via", str(h2.ip))
    lab.run(h1.ns, "nft", "add", "table", "ip", "someoneelse")
    lab.run(h1.ns, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "10.66.0.0/24",
            "-j", "MASQUERADE")

    proc = lab.run(h1.ns, sys.executable, "-m", "control.cli", "cleanup", "--tun-name", TUN,
                   check=False)
    assert proc.returncode == 0, proc.stderr
    assert "removed route 10.244.0.0/16 dev fltun0" in proc.stdout
    assert our_routes(lab, h1) == []
    assert TUN not in lab.ip(h1.ns, "link", "show").stdout
    tables = lab.run(h1.ns, "nft", "list", "tables").stdout
    assert "flannelette" not in tables and "someoneelse" in tables
    nat = lab.run(h1.ns, "iptables", "-w", "-t", "nat", "-S").stdout
    filt = lab.run(h1.ns, "iptables", "-w", "-t", "filter", "-S").stdout
    assert "FLANNELETTE" not in nat and "FLANNELETTE" not in filt
    assert "10.66.0.0/24" in nat
    assert "10.55.0.0/24" in lab.ip(h1.ns, "route", "show").stdout

    again = lab.run(h1.ns, sys.executable, "-m", "control.cli", "cleanup", "--tun-name", TUN,
                    check=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""


