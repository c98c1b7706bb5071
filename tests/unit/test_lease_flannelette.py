"""The flannelette capability inside a vxlan lease: round trip, flannel compatibility."""

from __future__ import annotations

import ipaddress
import json

import pytest

from control.config import BackendType
from control.lease import FLANNELETTE_FIELD, Lease, LeaseAttrs, decode_attrs, encode_attrs
from control.supervisor import peers_from_leases

A = ipaddress.IPv4Address
FLANNEL_VALUE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
MAC = bytes.fromhex("c6d2326f8f44")


def test_capable_lease_round_trips_and_keeps_flannels_fields_byte_identical() -> None:
    attrs = LeaseAttrs(A("192.168.64.3"), "vxlan", 1, MAC, csum_partial=True)
    text = encode_attrs(attrs)
    assert text == FLANNEL_VALUE[:-2] + ',"Flannelette":{"CsumPartial":true}}}'
    assert decode_attrs(text) == attrs
    # What flannel's vxlan backend reads (VNI, VtepMAC) is unchanged.
    data = json.loads(text)["BackendData"]
    assert {k: v for k, v in data.items() if k != FLANNELETTE_FIELD} == \
        json.loads(FLANNEL_VALUE)["BackendData"]


def test_flannel_lease_without_the_field_is_not_capable() -> None:
    attrs = decode_attrs(FLANNEL_VALUE)
    assert attrs.csum_partial is False
    assert encode_attrs(attrs) == FLANNEL_VALUE  # and we write it back as flannel does


@pytest.mark.parametrize("ext", [
    '{"CsumPartial":false}', '{"CsumPartial":1}', '{"CsumPartial":"true"}', '{}', 'null',
    'true', '[1]', '"x"', '{"Other":true}',
])
def test_anything_but_csum_partial_true_is_not_capable_and_never_an_error(ext: str) -> None:
    text = FLANNEL_VALUE[:-2] + f',"Flannelette":{ext}}}}}'
    attrs = decode_attrs(text)
    assert attrs.csum_partial is False and attrs.vtep_mac == MAC


def test_field_names_match_case_insensitively_like_go() -> None:
    text = FLANNEL_VALUE[:-2] + ',"flannelette":{"csumpartial":true}}}'
    assert decode_attrs(text).csum_partial is True


def test_host_gw_lease_never_carries_it() -> None:
    text = encode_attrs(LeaseAttrs(A("10.10.1.1"), "host-gw", csum_partial=True))
    assert text == '{"PublicIP":"10.10.1.1","PublicIPv6":null,"BackendType":"host-gw"}'
    assert decode_attrs(text).csum_partial is False


def test_agent_marks_only_capable_vxlan_peers_for_partial_checksums() -> None:
    n = ipaddress.IPv4Network
    leases = {
        n("10.5.1.0/24"): Lease(n("10.5.1.0/24"), decode_attrs(FLANNEL_VALUE)),  # real flannel
        n("10.5.2.0/24"): Lease(n("10.5.2.0/24"), LeaseAttrs(A("10.1.1.2"), "vxlan", 1, MAC,
                                                             csum_partial=True)),
    }
    peers = peers_from_leases(leases, BackendType.VXLAN)
    assert [(str(p.subnet), p.partial_csum) for p in peers] == [("10.5.1.0/24", False),
                                                               ("10.5.2.0/24", True)]
    hostgw = peers_from_leases(leases, BackendType.HOST_GW)
    assert not any(p.partial_csum for p in hostgw)
