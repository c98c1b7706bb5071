"""Reconcile: flannel's path rules per backend and reachability, route plans, idempotency."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control import reconcile as rc
from control.reconcile import OpKind, Route, RouteLookup, RouteOp
from dataplane.fib import Fib, Path, Peer

NETWORK = N("10.244.0.0/16")
OWN = N("10.244.1.0/24")
TUN = "fltun0"
MAC = bytes.fromhex("0a0000000002")

SAME = [RouteLookup(None, "eth0")]
VIA_GW = [RouteLookup(A("10.10.1.254"), "eth0")]
TWO = [RouteLookup(None, "eth0"), RouteLookup(None, "eth1")]
LOCAL = [RouteLookup(None, "lo", local=True)]
NOROUTE = None


def peer(n: int, *, mac: bytes | None = MAC, ip: str | None = None) -> Peer:
    return Peer(N(f"10.244.{n}.0/24"), A(ip or f"10.10.1.{n}"), mac)


# ---- the same-L2 test ----------------------------------------------------------------------
@pytest.mark.parametrize(("lookups", "same", "dev"), [
    (SAME, True, "eth0"),
    (VIA_GW, False, "eth0"),
    (TWO, False, None),
    ([], False, None),
    (LOCAL, False, None),
    (NOROUTE, False, None),
    ([RouteLookup(None, None)], False, None),
])
def test_same_l2_is_one_route_without_gateway(lookups, same, dev):
    r = rc.reachability(lookups)
    assert r.same_l2 is same
    assert r.dev == dev
    assert r.detail


# ---- every backend x reachability combination -------------------------------------------
# (backend, direct_routing, lookup, has VtepMAC) -> expected path
CASES = [
    ("host-gw", False, SAME, True, Path.DIRECT),
    ("host-gw", False, SAME, False, Path.DIRECT),  # host-gw leases carry no VtepMAC
    ("host-gw", False, VIA_GW, False, Path.UNREACHABLE),
    ("host-gw", False, TWO, False, Path.UNREACHABLE),
    ("host-gw", False, LOCAL, False, Path.UNREACHABLE),
    ("host-gw", False, NOROUTE, False, Path.UNREACHABLE),
    ("host-gw", True, VIA_GW, True, Path.UNREACHABLE),  # DirectRouting means nothing here
    ("vxlan", True, SAME, True, Path.DIRECT),
    ("vxlan", True, SAME, False, Path.DIRECT),
    ("vxlan", True, VIA_GW, True, Path.VXLAN),
    ("vxlan", True, TWO, True, Path.VXLAN),
    ("vxlan", True, NOROUTE, True, Path.VXLAN),
    ("vxlan", True, LOCAL, True, Path.VXLAN),
    ("vxlan", True, VIA_GW, False, Path.UNREACHABLE),
    ("vxlan", False, SAME, True, Path.VXLAN),
    ("vxlan", False, VIA_GW, True, Path.VXLAN),
    ("vxlan", False, NOROUTE, True, Path.VXLAN),
    ("vxlan", False, SAME, False, Path.UNREACHABLE),
    ("VxLAN", True, SAME, True, Path.DIRECT),  # the seed's casing
    ("Host-GW", False, SAME, True, Path.DIRECT),
]


@pytest.mark.parametrize(("backend", "dr", "lookups", "has_mac", "expected"), CASES)
def test_path_per_backend_and_reachability(backend, dr, lookups, has_mac, expected):
    p = peer(2, mac=MAC if has_mac else None)
    reach = {p.public_ip: rc.reachability(lookups)}
    pl = rc.plan(backend=backend, direct_routing=dr, network=NETWORK, own_subnet=OWN,
                 device=TUN, peers=[p], reach=reach, installed=[])
    (d,) = pl.decisions
    assert d.peer.path is expected
    assert d.peer.subnet == p.subnet and d.peer.public_ip == p.public_ip
    if expected is Path.UNREACHABLE:
        assert d.warning is not None and str(p.subnet) in d.warning
        assert d.warning in pl.warnings
    else:
        assert d.warning is None and not pl.warnings
    direct = [r for r in pl.desired if r.dst == p.subnet]
    if expected is Path.DIRECT:
        assert direct == [Route(p.subnet, p.public_ip, "eth0")]
    else:
        assert direct == []
    tun_routes = [r for r in pl.desired if r.dev == TUN]
    if rc.normalize_backend(backend) == "vxlan":
        assert tun_routes == [Route(NETWORK, None, TUN)]
    else:
        assert tun_routes == []
    # Whatever was decided, the dataplane can build its table from it.
    Fib.build(pl.peers)


def test_host_gw_warning_names_the_peer_and_the_reason():
    p = peer(3, ip="10.10.2.1", mac=None)
    reach = {p.public_ip: rc.reachability(VIA_GW)}
    pl = rc.plan(backend="host-gw", direct_routing=False, network=NETWORK, own_subnet=OWN,
                 device=None, peers=[p], reach=reach, installed=[])
    (w,) = pl.warnings
    assert "10.244.3.0/24" in w and "10.10.2.1" in w and "10.10.1.254" in w
    assert "not on our L2 segment" in w


def test_own_subnet_skipped_and_duplicates_warned():
    own = Peer(OWN, A("10.10.1.1"), MAC)
    a, dup = peer(2), peer(2, ip="10.10.1.99")
    pl = rc.plan(backend="vxlan", direct_routing=False, network=NETWORK, own_subnet=OWN,
                 device=TUN, peers=[own, a, dup], reach={}, installed=[])
    assert [d.peer.public_ip for d in pl.decisions] == [a.public_ip]
    assert any("duplicate" in w and "10.10.1.99" in w for w in pl.warnings)


def test_peer_outside_network_gets_no_route():
    p = Peer(N("10.99.0.0/24"), A("10.10.1.5"), MAC)
    pl = rc.plan(backend="host-gw", direct_routing=False, network=NETWORK, own_subnet=OWN,
                 device=None, peers=[p], reach={p.public_ip: rc.reachability(SAME)},
                 installed=[])
    assert pl.decisions[0].peer.path is Path.UNREACHABLE
    assert pl.desired == ()


def test_vxlan_without_device_is_a_clear_error():
    with pytest.raises(rc.RouteError, match="TUN device"):
        rc.plan(backend="vxlan", direct_routing=False, network=NETWORK, own_subnet=OWN,
                device=None, peers=[peer(2)], reach={}, installed=[])


def test_unknown_backend_is_named():
    with pytest.raises(rc.RouteError, match="unknown backend type: udp"):
        rc.normalize_backend("udp")


def test_lookup_needed_only_for_host_gw_and_direct_routing():
    assert rc.needs_lookup("host-gw", False)
    assert rc.needs_lookup("vxlan", True)
    assert not rc.needs_lookup("VXLAN", False)


# ---- plans: changes, removals, ordering -----------------------------------------------------
def _reach_all(peers: list[Peer], lookups: list[RouteLookup] | None = SAME
               ) -> dict[A, rc.Reachability]:
    return {p.public_ip: rc.reachability(lookups) for p in peers}


def test_peer_removed_deletes_its_route():
    peers = [peer(2), peer(3)]
    first = rc.plan(backend="host-gw", direct_routing=False, network=NETWORK, own_subnet=OWN,
                    device=None, peers=peers, reach=_reach_all(peers), installed=[])
    assert [o.kind for o in first.ops] == [OpKind.REPLACE, OpKind.REPLACE]
    installed = rc.apply_to([], first.ops)
    second = rc.plan(backend="host-gw", direct_routing=False, network=NETWORK, own_subnet=OWN,
                     device=None, peers=peers[:1], reach=_reach_all(peers), installed=installed)
    assert second.ops == (RouteOp(OpKind.DELETE, Route(N("10.244.3.0/24"), A("10.10.1.3"),
                                                       "eth0")),)


def test_public_ip_change_is_one_replace_not_delete_and_add():
    old = peer(2)
    installed = [Route(old.subnet, old.public_ip, "eth0")]
    new = Peer(old.subnet, A("10.10.1.42"), MAC)
    pl = rc.plan(backend="host-gw", direct_routing=False, network=NETWORK, own_subnet=OWN,
                 device=None, peers=[new], reach=_reach_all([new]), installed=installed)
    assert pl.ops == (RouteOp(OpKind.REPLACE, Route(new.subnet, new.public_ip, "eth0")),)


def test_switch_vxlan_to_host_gw_replaces_before_deleting():
    peers = [peer(2), peer(3)]
    installed = [Route(NETWORK, None, TUN)]
    pl = rc.plan(backend="host-gw", direct_routing=False, network=NETWORK, own_subnet=OWN,
                 device=TUN, peers=peers, reach=_reach_all(peers), installed=installed)
    kinds = [o.kind for o in pl.ops]
    assert kinds == [OpKind.REPLACE, OpKind.REPLACE, OpKind.DELETE]
    assert pl.ops[-1].route == Route(NETWORK, None, TUN)


def test_switch_direct_routing_off_removes_direct_routes_keeps_tun_route():
    peers = [peer(2)]
    reach = _reach_all(peers)
    on = rc.plan(backend="vxlan", direct_routing=True, network=NETWORK, own_subnet=OWN,
                 device=TUN, peers=peers, reach=reach, installed=[])
    installed = rc.apply_to([], on.ops)
    assert Route(N("10.244.2.0/24"), A("10.10.1.2"), "eth0") in installed
    off = rc.plan(backend="vxlan", direct_routing=False, network=NETWORK, own_subnet=OWN,
                  device=TUN, peers=peers, reach=reach, installed=installed)
    assert [str(o) for o in off.ops] == ["delete 10.244.2.0/24 via 10.10.1.2 dev eth0"]


def test_path_change_lines_one_per_changed_peer():
    before = {N("10.244.2.0/24"): Path.VXLAN, N("10.244.3.0/24"): Path.VXLAN,
              N("10.244.4.0/24"): Path.DIRECT}
    peers = [peer(2), peer(3, ip="10.10.2.3")]
    reach = {A("10.10.1.2"): rc.reachability(SAME), A("10.10.2.3"): rc.reachability(VIA_GW)}
    decisions, _ = rc.choose_paths("vxlan", True, NETWORK, OWN, peers, reach)
    lines = rc.path_changes(before, decisions)
    assert len(lines) == 2
    assert "10.244.2.0/24" in lines[0] and "vxlan -> direct" in lines[0]
    assert "10.244.4.0/24" in lines[1] and "removed" in lines[1]
    assert rc.path_changes({d.peer.subnet: d.peer.path for d in decisions}, decisions) == []


def test_make_before_break_keeps_tunnel_for_peers_leaving_it():
    before = [peer(2), peer(3)]  # both VXLAN
    after = [Peer(N("10.244.2.0/24"), A("10.10.1.2"), MAC, Path.DIRECT),
             Peer(N("10.244.3.0/24"), A("10.10.1.3"), MAC, Path.VXLAN),
             Peer(N("10.244.4.0/24"), A("10.10.1.4"), MAC, Path.DIRECT)]
    mid = rc.make_before_break(before, after)
    assert [p.path for p in mid] == [Path.VXLAN, Path.VXLAN, Path.DIRECT]


# ---- idempotency (property) -------------------------------------------------------------------
LOOKUPS = st.sampled_from([SAME, VIA_GW, TWO, LOCAL, NOROUTE])
_peer_st = st.builds(
    lambda n, host, mac: Peer(N(f"10.244.{n}.0/24"), A(f"10.10.{host // 250}.{host % 250 + 1}"),
                              MAC if mac else None),
    st.integers(0, 40), st.integers(0, 600), st.booleans())
_route_st = st.builds(
    lambda n, gw, dev: Route(N(f"10.244.{n}.0/24") if n >= 0 else NETWORK,
                             A(f"10.10.1.{gw}") if gw else None, dev),
    st.integers(-1, 40), st.integers(0, 5), st.sampled_from(["eth0", TUN, "eth1"]))


@settings(max_examples=300, deadline=None)
@given(backend=st.sampled_from(["vxlan", "host-gw"]), dr=st.booleans(),
       peers=st.lists(_peer_st, max_size=12), lookups=st.lists(LOOKUPS, min_size=1),
       installed=st.lists(_route_st, max_size=8, unique_by=lambda r: r.dst))
def test_plan_is_idempotent_and_reaches_desired(backend, dr, peers, lookups, installed):
    reach = {p.public_ip: rc.reachability(lookups[i % len(lookups)])
             for i, p in enumerate(peers)}
    kw = dict(backend=backend, direct_routing=dr, network=NETWORK, own_subnet=OWN, device=TUN,
              peers=peers, reach=reach)
    first = rc.plan(**kw, installed=installed)
    after = rc.apply_to(installed, first.ops)
    assert after == frozenset(first.desired)
    again = rc.plan(**kw, installed=after)
    assert again.ops == ()
    assert again.decisions == first.decisions
    # Every DIRECT peer has exactly its route; nothing else but the TUN route exists.
    direct = {d.peer.subnet for d in first.decisions if d.peer.path is Path.DIRECT}
    assert {r.dst for r in after} - {NETWORK} == direct
    assert all(isinstance(r.dst, ipaddress.IPv4Network) for r in after)
    Fib.build(first.peers)
