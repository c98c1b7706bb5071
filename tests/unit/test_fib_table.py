"""The forwarding table: masked O(1) lookups, path filtering, whole-set replacement."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.fib import Fib, FibError, Path, Peer

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


def peer(i: int, path: Path = Path.VXLAN, mac: bytes | None = b"\x0a" + bytes(5)) -> Peer:
    return Peer(NET(f"10.244.{i}.0/24"), IP(f"10.10.1.{i}"), mac, path)


def test_lookup_by_any_address_of_the_subnet() -> None:
    fib = Fib.build([peer(2), peer(3)])
    for last in (0, 1, 77, 255):
        e = fib.lookup(int(IP(f"10.244.2.{last}")))
        assert e is not None and e.public_ip_str == "10.10.1.2"
    assert fib.lookup(int(IP("10.244.4.1"))) is None
    assert fib.lookup(int(IP("10.245.2.1"))) is None


def test_only_vxlan_peers_are_tunnelled() -> None:
    fib = Fib.build([peer(2), peer(3, Path.DIRECT, None), peer(4, Path.UNREACHABLE, None)])
    assert set(fib.by_public_ip()) == {int(IP("10.10.1.2"))}
    assert fib.lookup(int(IP("10.244.3.9"))) is None
    assert len(fib.peers) == 3


def test_bad_peer_sets_are_refused() -> None:
    with pytest.raises(FibError):
        Fib.build([peer(2), Peer(NET("10.244.3.0/25"), IP("10.10.1.3"), bytes(6))])
    with pytest.raises(FibError):
        Fib.build([peer(2), peer(2)])
    with pytest.raises(FibError):
        Fib.build([peer(2, Path.VXLAN, None)])
    with pytest.raises(FibError):
        Peer(NET("10.244.2.0/24"), IP("10.10.1.2"), b"\x01")
    with pytest.raises(FibError):
        Fib.build([peer(2)], prefixlen=16)


def test_replacement_is_a_new_table() -> None:
    old = Fib.build([peer(2), peer(3)])
    new = Fib.build([peer(3), peer(4)])
    assert old.lookup(int(IP("10.244.2.5"))) is not None  # the old table is untouched
    assert new.lookup(int(IP("10.244.2.5"))) is None
    assert new.lookup(int(IP("10.244.4.5"))) is not None


def test_empty_table() -> None:
    fib = Fib.build([])
    assert fib.lookup(0) is None and fib.lookup(0xFFFFFFFF) is None


@given(st.sets(st.integers(0, 255), max_size=40), st.integers(0, 0xFFFFFFFF))
def test_lookup_agrees_with_containment(thirds: set[int], addr: int) -> None:
    peers = [Peer(NET(f"10.{t}.0.0/16"), IP(f"10.10.{t}.1"), bytes([2, 0, 0, 0, 0, t]))
             for t in thirds]
    fib = Fib.build(peers)
    expected = [p for p in peers if IP(addr) in p.subnet]
    e = fib.lookup(addr)
    assert (e.peer if e else None) == (expected[0] if expected else None)
