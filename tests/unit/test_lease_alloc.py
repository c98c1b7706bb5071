"""Leases: flannel's key and value formats, allocation order, diffs, renewal timing."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.config import parse_config
from control.errors import AllocationError, LeaseValueError
from control.lease import (
    Lease,
    LeaseAttrs,
    RawLease,
    decode_attrs,
    decode_lease,
    diff_leases,
    encode_attrs,
    parse_key,
    plan_acquire,
    renew_at,
    subnet_key,
)

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
CFG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
FLANNEL_VALUE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')


def vx(ip: str, mac: int = 1) -> LeaseAttrs:
    return LeaseAttrs(A(ip), "vxlan", 1, bytes([2, 0, 0, 0, 0, mac]))


def test_key_layout() -> None:
    assert subnet_key("/coreos.com/network", N("10.5.34.0/24")) == \
        "/coreos.com/network/subnets/10.5.34.0-24"
    assert subnet_key("/x/", N("10.5.34.0/24")) == "/x/subnets/10.5.34.0-24"
    assert parse_key("/coreos.com/network/subnets/10.5.34.0-24") == N("10.5.34.0/24")
    assert parse_key("/coreos.com/network/subnets/10.5.34.0-24&fc00::-64") == N("10.5.34.0/24")
    assert parse_key("/coreos.com/network/subnets/10.5.34.1-24") is None  # host bits
    assert parse_key("/coreos.com/network/config") is None


def test_flannel_value_decodes() -> None:
    attrs = decode_attrs(FLANNEL_VALUE)
    assert attrs == LeaseAttrs(A("192.168.64.3"), "vxlan", 1,
                               bytes.fromhex("c6d2326f8f44"))


def test_our_value_is_byte_identical_to_flannels() -> None:
    assert encode_attrs(decode_attrs(FLANNEL_VALUE)) == FLANNEL_VALUE
    hostgw = '{"PublicIP":"10.10.1.1","PublicIPv6":null,"BackendType":"host-gw"}'
    assert encode_attrs(LeaseAttrs(A("10.10.1.1"), "host-gw")) == hostgw
    assert decode_attrs(hostgw) == LeaseAttrs(A("10.10.1.1"), "host-gw")


def test_value_decoding_is_case_insensitive_like_go() -> None:
    text = ('{"publicip":"10.1.1.1","backendtype":"VXLAN",'
            '"backenddata":{"vni":3,"vtepmac":"AA-BB-CC-DD-EE-01"}}')
    want = LeaseAttrs(A("10.1.1.1"), "vxlan", 3, bytes.fromhex("aabbccddee01"))
    assert decode_attrs(text) == want


@pytest.mark.parametrize("value", [
    "", "not json", "[]", '{"PublicIP":"nope","BackendType":"vxlan"}',
    '{"PublicIP":"10.1.1.1","BackendType":"vxlan"}',
    '{"PublicIP":"10.1.1.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}',
    '{"PublicIP":"10.1.1.1","BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":"aa:bb:cc:dd:ee:ff"}}',
    '{"PublicIP":"10.1.1.1","BackendType":7}',
])
def test_malformed_values_raise_lease_value_error(value: str) -> None:
    with pytest.raises(LeaseValueError):
        decode_lease(RawLease(N("10.5.9.0/24"), value))


def test_reuse_by_public_ip_first() -> None:
    leases = [Lease(N("10.5.7.0/24"), vx("10.10.1.1")), Lease(N("10.5.8.0/24"), vx("10.10.1.2"))]
    plan = plan_acquire(CFG, leases, A("10.10.1.1"), [N("10.5.9.0/24")], random.Random(1))
    assert plan.subnet == N("10.5.7.0/24") and plan.reuse and plan.stale == ()


def test_our_lease_that_no_longer_fits_is_stale() -> None:
    leases = [Lease(N("10.6.7.0/24"), vx("10.10.1.1"))]
    plan = plan_acquire(CFG, leases, A("10.10.1.1"), [N("10.5.9.0/24")], random.Random(1))
    assert plan == type(plan)(N("10.5.9.0/24"), False, (N("10.6.7.0/24"),))


def test_preferred_subnet_then_random_among_first_100() -> None:
    taken = [Lease(N("10.5.9.0/24"), vx("10.10.1.9"))]
    plan = plan_acquire(CFG, taken, A("10.10.1.1"), [N("10.5.9.0/24"), N("10.5.10.0/24")],
                        random.Random(1))
    assert plan.subnet == N("10.5.10.0/24") and not plan.reuse
    outside = plan_acquire(CFG, [], A("10.10.1.1"), [N("10.7.0.0/24")], random.Random(1))
    assert int(outside.subnet.network_address) < int(A("10.5.101.0"))  # first 100 free
    chosen = {plan_acquire(CFG, [], A("10.10.1.1"), [], random.Random(s)).subnet
              for s in range(200)}
    assert len(chosen) > 50  # random, not always the first
    assert all(N("10.5.1.0/24") <= s <= N("10.5.100.0/24") for s in chosen)


def test_exclude_and_exhaustion() -> None:
    small = parse_config('{"Network":"10.5.0.0/28","Backend":{"Type":"vxlan"}}')
    # /28 -> /30 subnets; SubnetMin skips the first: three usable.
    subnets = {plan_acquire(small, [], A("10.0.0.1"), [], random.Random(s)).subnet
               for s in range(50)}
    assert subnets == {N("10.5.0.4/30"), N("10.5.0.8/30"), N("10.5.0.12/30")}
    leases = [Lease(N("10.5.0.4/30"), vx("10.0.0.2")), Lease(N("10.5.0.8/30"), vx("10.0.0.3"))]
    plan = plan_acquire(small, leases, A("10.0.0.1"), [], random.Random(1))
    assert plan.subnet == N("10.5.0.12/30")
    with pytest.raises(AllocationError, match="no free subnet"):
        plan_acquire(small, leases, A("10.0.0.1"), [], random.Random(1),
                     exclude=[N("10.5.0.12/30")])


def test_leases_of_other_lengths_block_overlaps() -> None:
    leases = [Lease(N("10.5.0.0/20"), vx("10.0.0.2"))]
    plan = plan_acquire(CFG, leases, A("10.0.0.1"), [N("10.5.3.0/24")], random.Random(1))
    assert not plan.subnet.overlaps(N("10.5.0.0/20"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=254), max_size=80, unique=True),
       st.integers(min_value=0, max_value=2**32))
def test_allocation_never_overlaps_and_fits(third: list[int], seed: int) -> None:
    leases = [Lease(N(f"10.5.{t}.0/24"), vx(f"10.20.{t}.1")) for t in third]
    plan = plan_acquire(CFG, leases, A("10.10.1.1"), [], random.Random(seed))
    assert CFG.contains_subnet(plan.subnet)
    assert all(not plan.subnet.overlaps(le.subnet) for le in leases)


def test_diff_ignores_renewals() -> None:
    a = Lease(N("10.5.1.0/24"), vx("10.0.0.1"), 100.0)
    a_renewed = Lease(N("10.5.1.0/24"), vx("10.0.0.1"), 200.0)
    b = Lease(N("10.5.2.0/24"), vx("10.0.0.2"))
    b2 = Lease(N("10.5.2.0/24"), vx("10.0.0.2", mac=9))
    c = Lease(N("10.5.3.0/24"), vx("10.0.0.3"))
    d = diff_leases({a.subnet: a, b.subnet: b}, {a.subnet: a_renewed, b.subnet: b2,
                                                 c.subnet: c})
    assert d.added == (c,) and d.changed == (b2,) and d.removed == ()
    assert not diff_leases({a.subnet: a}, {a.subnet: a_renewed})
    assert diff_leases({a.subnet: a}, {}).removed == (a.subnet,)


def test_renew_at_margin() -> None:
    assert renew_at(86400.0, 3600.0, 0.0) == 82800.0
    assert renew_at(100.0, 3600.0, 50.0) == 50.0


def test_encoded_value_is_json_flannel_reads() -> None:
    doc = json.loads(encode_attrs(vx("10.10.1.1", mac=0xab)))
    assert doc == {"PublicIP": "10.10.1.1", "PublicIPv6": None, "BackendType": "vxlan",
                   "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:ab"}}


def test_previous_vtep_mac_is_the_one_our_lease_holds() -> None:
    import ipaddress as ip
    import json

    from control.lease import RawLease, previous_vtep_mac
    me = ip.IPv4Address("10.10.1.1")

    def raw(subnet: str, public: str, mac: str) -> RawLease:
        value = json.dumps({"PublicIP": public, "BackendType": "vxlan",
                            "BackendData": {"VNI": 1, "VtepMAC": mac}})
        return RawLease(ip.IPv4Network(subnet), value)
    leases = [raw("10.7.1.0/24", "10.10.1.2", "0a:00:00:00:00:02"),
              raw("10.7.2.0/24", "10.10.1.1", "0a:00:00:00:00:01"),
              raw("10.7.3.0/24", "10.10.1.1", "0a:00:00:00:00:03"),
              RawLease(ip.IPv4Network("10.7.4.0/24"), "not json")]
    assert previous_vtep_mac(leases, me) == bytes.fromhex("0a0000000001")
    assert previous_vtep_mac(leases, me, [ip.IPv4Network("10.7.3.0/24")]) == bytes.fromhex(
        "0a0000000003")
    assert previous_vtep_mac(leases, ip.IPv4Address("10.10.9.9")) is None
