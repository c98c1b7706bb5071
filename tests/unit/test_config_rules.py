"""Network config parsing: flannel's case-insensitive fields, defaults and every rule."""

from __future__ import annotations

import ipaddress

import pytest

from control.config import NetworkConfig, parse_config
from control.errors import ConfigError

SEED = '{"Network":"172.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}'


def test_seed_config_is_vxlan_with_direct_routing() -> None:
    cfg = parse_config(SEED)
    assert cfg.network == ipaddress.IPv4Network("172.7.0.0/16")
    assert cfg.backend.type == "vxlan"
    assert cfg.backend.direct_routing is True
    assert (cfg.backend.vni, cfg.backend.port, cfg.backend.mtu) == (1, 8472, None)
    assert cfg.subnet_len == 24
    assert cfg.subnet_min == ipaddress.IPv4Address("172.7.1.0")
    assert cfg.subnet_max == ipaddress.IPv4Address("172.7.255.0")


@pytest.mark.parametrize("text", [
    '{"network":"10.5.0.0/16","backend":{"type":"VXLAN","directRouting":true,"vni":7}}',
    '{"NETWORK":"10.5.0.0/16","BACKEND":{"TYPE":"vxlan","DIRECTROUTING":true,"VNI":7}}',
    '{"Network":"10.5.0.0/16","Backend":{"Type":"vXlAn","DirectRouting":true,"VNI":7}}',
])
def test_field_names_and_type_are_case_insensitive(text: str) -> None:
    cfg = parse_config(text)
    assert cfg.backend.type == "vxlan" and cfg.backend.direct_routing and cfg.backend.vni == 7


def test_vxlan_options() -> None:
    cfg = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":42,'
                       '"Port":4789,"MTU":1400,"GBP":true,"Learning":true}}')
    b = cfg.backend
    assert (b.vni, b.port, b.mtu, b.gbp, b.learning, b.direct_routing) == (
        42, 4789, 1400, True, True, False)
    assert cfg.mtu_for(1500) == 1400


def test_mtu_from_interface_minus_vxlan_overhead() -> None:
    assert parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
                        ).mtu_for(1500) == 1450
    assert parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}'
                        ).mtu_for(1500) == 1500


def test_port_zero_means_8472() -> None:
    cfg = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","Port":0}}')
    assert cfg.backend.port == 8472


def test_host_gw_accepted() -> None:
    assert parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"Host-GW"}}'
                        ).backend.type == "host-gw"


@pytest.mark.parametrize(("network", "subnet_len"), [
    ("10.0.0.0/8", 24), ("10.5.0.0/16", 24), ("10.5.0.0/22", 24),
    ("10.5.0.0/23", 25), ("10.5.0.0/26", 28), ("10.5.0.0/28", 30),
])
def test_default_subnet_len(network: str, subnet_len: int) -> None:
    cfg = parse_config(f'{{"Network":"{network}","Backend":{{"Type":"vxlan"}}}}')
    assert cfg.subnet_len == subnet_len
    size = 1 << (32 - subnet_len)
    net = ipaddress.IPv4Network(network)
    assert int(cfg.subnet_min) == int(net.network_address) + size
    assert int(cfg.subnet_max) == int(net.broadcast_address) + 1 - size


def test_network_host_bits_are_masked_like_go() -> None:
    assert parse_config('{"Network":"10.5.3.7/16","Backend":{"Type":"vxlan"}}'
                        ).network == ipaddress.IPv4Network("10.5.0.0/16")


def test_explicit_min_max_len() -> None:
    cfg = parse_config('{"Network":"10.5.0.0/16","SubnetLen":26,"SubnetMin":"10.5.1.0",'
                       '"SubnetMax":"10.5.2.192","Backend":{"Type":"vxlan"}}')
    assert (cfg.subnet_len, str(cfg.subnet_min), str(cfg.subnet_max)) == (
        26, "10.5.1.0", "10.5.2.192")
    assert cfg.contains_subnet(ipaddress.IPv4Network("10.5.2.64/26"))
    assert not cfg.contains_subnet(ipaddress.IPv4Network("10.5.3.0/26"))
    assert not cfg.contains_subnet(ipaddress.IPv4Network("10.5.1.0/24"))


BAD_CONFIGS = [
    ('{"Backend":{"Type":"vxlan"}}',
     "please define a correct Network parameter in the flannel config"),
    ('{"Network":"","Backend":{"Type":"vxlan"}}',
     "please define a correct Network parameter in the flannel config"),
    ('{"Network":"10.5.0.0/29","Backend":{"Type":"vxlan"}}',
     "network is too small. Minimum useful network prefix is /28"),
    ('{"Network":"10.5.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}',
     "SubnetLen must be less than /31"),
    ('{"Network":"10.5.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}',
     "network must be able to accommodate at least four subnets"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0","Backend":{"Type":"vxlan"}}',
     "SubnetMin is not in the range of the Network"),
    ('{"Network":"10.5.0.0/16","SubnetMax":"10.4.0.0","Backend":{"Type":"vxlan"}}',
     "SubnetMax is not in the range of the Network"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.7","Backend":{"Type":"vxlan"}}',
     "SubnetMin is not on a SubnetLen boundary: 10.5.1.7"),
    ('{"Network":"10.5.0.0/16","SubnetMax":"10.5.9.128","Backend":{"Type":"vxlan"}}',
     "SubnetMax is not on a SubnetLen boundary: 10.5.9.128"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"ipip"}}', "unknown backend type: ipip"),
    ('{"Network":"10.5.0.0/16","Backend":{}}', "unknown backend type: "),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}', "backend type udp"),
    ('{"Network":"10.5.0.0/16"}', "backend type udp"),
    ('{"Network":"not-a-cidr","Backend":{"Type":"vxlan"}}', "'not-a-cidr'"),
    ('{"Network":"10.5.0.0","Backend":{"Type":"vxlan"}}', "'10.5.0.0'"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"x","Backend":{"Type":"vxlan"}}',
     "SubnetMin must be an IPv4 address, got 'x'"),
    ('{"Network":"10.5.0.0/16","SubnetLen":"24","Backend":{"Type":"vxlan"}}',
     "SubnetLen must be an integer, got '24'"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":"1"}}',
     "Backend.VNI must be an integer, got '1'"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}',
     "Backend.VNI must be in 0..16777215, got 16777216"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}',
     "Backend.DirectRouting must be true or false, got 'yes'"),
    ('{"Network":"10.5.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}', "EnableIPv6"),
    ('{"Network":"10.5.0.0/16",', "not valid JSON"),
    ('["10.5.0.0/16"]', "must be a JSON object"),
    ('{"Network":"10.5.0.0/16","Backend":"vxlan"}', "error decoding Backend property"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_every_rule_has_its_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)


def test_result_is_frozen() -> None:
    cfg = parse_config(SEED)
    assert isinstance(cfg, NetworkConfig)
    with pytest.raises(AttributeError):
        cfg.subnet_len = 8  # type: ignore[misc]
