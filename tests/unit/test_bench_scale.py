"""The synthetic cluster the scale benchmark writes into etcd."""

from __future__ import annotations

import ipaddress
import json

from benchmarks import scale


def test_peer_subnets_are_distinct_aligned_and_far_from_subnet_min() -> None:
    subnets = [scale.peer_subnet(i) for i in range(6000)]
    assert len(set(subnets)) == 6000
    assert all(s.prefixlen == scale.SUBNET_LEN and s.subnet_of(scale.NETWORK) for s in subnets)
    # The agent allocates from SubnetMin (the second subnet) upwards: keep clear of it.
    bottom = ipaddress.IPv4Network((int(scale.NETWORK.network_address) + 256 * 1024, 24))
    assert min(int(s.network_address) for s in subnets) > int(bottom.network_address)


def test_half_the_peers_share_the_agents_segment() -> None:
    seg = ipaddress.IPv4Network(scale.SEGMENT)
    ips = [scale.peer_public_ip(i) for i in range(6000)]
    assert len(set(ips)) == 6000
    assert all((ip in seg) == (i % 2 == 0) for i, ip in enumerate(ips))
    assert ipaddress.IPv4Address("10.10.0.1") not in ips  # the agent host itself


def test_peer_macs_are_unique_locally_administered_unicast() -> None:
    macs = {scale.peer_mac(i) for i in range(6000)} | {scale.peer_mac(i, 1) for i in range(10)}
    assert len(macs) == 6010
    for m in macs:
        first = int(m.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01 and m == m.lower()


def test_lease_key_and_value_are_flannels() -> None:
    sub = scale.peer_subnet(3)
    assert scale.lease_key(sub) == f"/coreos.com/network/subnets/{sub.network_address}-24"
    v = json.loads(scale.lease_value(3))
    assert v == {"PublicIP": str(scale.peer_public_ip(3)), "PublicIPv6": None,
                 "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": scale.peer_mac(3)}}
    cfg = json.loads(scale.network_config())
    assert cfg["Backend"] == {"Type": "vxlan", "DirectRouting": True}
    assert ipaddress.IPv4Network(cfg["Network"]) == scale.NETWORK


def test_proc_net_route_parser_finds_direct_peer_routes() -> None:
    # Captured layout of /proc/net/route: default via the core, a direct route to peer 0,
    # a link route (no gateway) and a route outside the overlay network.
    p0 = scale.peer_subnet(0)

    def hexle(ip: str) -> str:
        return ipaddress.IPv4Address(ip).packed[::-1].hex().upper()

    rows = [("eth0", "0.0.0.0", "10.10.255.254", "0.0.0.0"),
            ("eth0", str(p0.network_address), str(scale.peer_public_ip(0)), "255.255.255.0"),
            ("eth0", "10.10.0.0", "0.0.0.0", "255.255.0.0"),
            ("eth0", "10.99.0.0", "10.10.0.7", "255.255.255.0")]
    text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    text += "".join(f"{i}\t{hexle(d)}\t{hexle(g)}\t0003\t0\t0\t0\t{hexle(m)}\t0\t0\t0\n"
                    for i, d, g, m in rows)
    routes = scale.parse_proc_net_route(text)
    assert (p0, scale.peer_public_ip(0)) in routes
    assert (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Address("10.10.255.254")) in routes
    assert len(routes) == 3  # the link route has no gateway
    assert scale.direct_subnets(text) == {str(p0)}
