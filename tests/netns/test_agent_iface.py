"""--iface resolution inside a host namespace: by name, by address, default route, errors."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.lab import Lab

pytestmark = pytest.mark.netns

_PROBE = """
import json, sys
from control.errors import FlagError
from control.iface import find_interface
try:
    i = find_interface(sys.argv[1:])
    print(json.dumps({"name": i.name, "address": str(i.address), "mtu": i.mtu}))
except FlagError as e:
    print(json.dumps({"error": str(e)}))
"""


def probe(lab: Lab, ns: str, *specs: str) -> dict[str, object]:
    out = lab.run(ns, sys.executable, "-c", _PROBE, *specs).stdout
    doc: dict[str, object] = json.loads(out)
    return doc


def test_iface_by_name_address_default_and_missing(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A")
    lab.ip(h1.ns, "link", "add", "extra0", "mtu", "9000", "type", "veth", "peer", "name",
           "extra1", "mtu", "9000")
    lab.ip(h1.ns, "addr", "add", "10.77.0.5/24", "dev", "extra0")
    lab.ip(h1.ns, "link", "set", "extra0", "up")
    want_eth0 = {"name": "eth0", "address": str(h1.ip), "mtu": 1500}
    assert probe(lab, h1.ns) == want_eth0  # the default route's interface
    assert probe(lab, h1.ns, "eth0") == want_eth0
    assert probe(lab, h1.ns, "10.77.0.5") == {"name": "extra0", "address": "10.77.0.5",
                                              "mtu": 9000}
    # Repeatable: the first that exists wins.
    assert probe(lab, h1.ns, "nope0", "extra0")["name"] == "extra0"
    err = probe(lab, h1.ns, "nope0")["error"]
    assert isinstance(err, str) and "--iface nope0: no such interface" in err
