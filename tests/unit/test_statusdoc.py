"""control.statusdoc: /status and /readyz from a frozen snapshot, no root, no etcd, no clock."""

from __future__ import annotations

import ipaddress
import json

from control import metrics
from control.config import parse_config
from control.lease import Lease, LeaseAttrs
from control.reconcile import Decision
from control.statusdoc import DataplaneState, Snapshot, WatchState, readiness, status
from dataplane.fib import Path, Peer
from dataplane.stats import EngineStats, PeerCounters

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
CONFIG = parse_config('{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}')
OWN = N("10.7.1.0/24")
MAC = bytes([2, 0xAB, 0, 0, 0, 1])
PEER = Peer(N("10.7.2.0/24"), A("10.10.1.2"), bytes([2, 0, 0, 0, 0, 2]), Path.VXLAN)
DIRECT = Peer(N("10.7.3.0/24"), A("10.10.1.3"), None, Path.DIRECT)


def snap(**kw: object) -> Snapshot:
    base: dict[str, object] = dict(
        config=CONFIG, mtu=1450, public_ip=A("10.10.1.1"), iface="eth0", vtep_mac=MAC,
        etcd_api="v3", endpoints=("http://10.10.0.1:2379",),
        lease=Lease(OWN, LeaseAttrs(A("10.10.1.1"), "vxlan", 1, MAC)),
        lease_expires_at=2_000_000.0,
        watch=WatchState(connected=True, synced=True, reconnects=2),
        dataplane=DataplaneState(
            up=True, peers=(PEER, DIRECT),
            decisions=(Decision(PEER, "DirectRouting: routed via gateway 10.10.1.254, "
                                      "tunnelled"),
                       Decision(DIRECT, "DirectRouting: same L2 segment (dev eth0)")),
            engine=EngineStats(peers={"10.7.2.0/24": PeerCounters(3, 300, 4, 400)},
                               drops={"no_route": 5}, tun_packets=7),
            route_operations={"replace": 2, "delete": 0, "failed": 0},
            warnings=("net.ipv4.ip_forward is 0",)))
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_status_document_fields() -> None:
    doc = status(snap(), now=100.0)
    json.dumps(doc)  # JSON-ready as it is
    assert doc["node"] == {
        "subnet": "10.7.1.0/24", "public_ip": "10.10.1.1", "backend": "vxlan",
        "direct_routing": True, "vtep_mac": "02:ab:00:00:00:01", "mtu": 1450,
        "etcd_api": "v3", "iface": "eth0", "network": "10.7.0.0/16"}
    peers = doc["peers"]
    assert isinstance(peers, list)
    assert peers[0] == {
        "subnet": "10.7.2.0/24", "public_ip": "10.10.1.2", "vtep_mac": "02:00:00:00:00:02",
        "path": "vxlan", "tx_packets": 3, "rx_packets": 4, "tx_bytes": 300, "rx_bytes": 400,
        "reason": "DirectRouting: routed via gateway 10.10.1.254, tunnelled", "warning": None}
    assert peers[1]["path"] == "direct" and peers[1]["tx_packets"] == 0
    assert peers[1]["vtep_mac"] is None
    assert doc["drops"] == {"no_route": 5}
    engine = doc["engine"]
    assert isinstance(engine, dict) and engine["tun_packets"] == 7
    assert "peers" not in engine and "drops" not in engine
    assert doc["etcd"] == {"connected": True, "lease_expires_at": 2_000_000.0,
                           "disconnected_for": None, "reconnects": 2,
                           "endpoints": ["http://10.10.0.1:2379"]}
    assert doc["reconcile"] == {"operations": {"replace": 2, "delete": 0, "failed": 0}}
    assert doc["warnings"] == ["net.ipv4.ip_forward is 0"]


def test_metrics_render_from_the_same_document() -> None:
    text = metrics.render(lambda: status(snap(), now=0.0)).decode()
    assert 'flannelette_peer_transmit_packets_total{path="vxlan",peer_subnet="10.7.2.0/24"} 3.0' \
        in text
    assert 'flannelette_dropped_packets_total{reason="no_route"} 5.0' in text


def test_disconnected_etcd_counts_from_the_first_failure() -> None:
    s = snap(watch=WatchState(connected=False, synced=True, failing_since=90.0))
    doc = status(s, now=100.0)
    etcd = doc["etcd"]
    assert isinstance(etcd, dict) and etcd["disconnected_for"] == 10.0
    ready, why = readiness(s, now=100.04)
    assert ready  # a lease, one sync and a running dataplane: still forwarding
    assert why["etcd_connected"] is False and why["etcd_unreachable_for"] == 10.0


def test_not_ready_before_the_lease_sync_and_dataplane() -> None:
    bare = snap(lease=None, watch=None, dataplane=DataplaneState())
    ready, why = readiness(bare, now=5.0)
    assert not ready
    assert why == {"lease_held": False, "peers_synced": False, "dataplane_up": False,
                   "etcd_connected": False, "etcd_unreachable_for": 0.0}
    doc = status(bare, now=5.0)
    assert doc["peers"] == [] and doc["engine"] == {} and doc["drops"] == {}
    node = doc["node"]
    assert isinstance(node, dict) and node["subnet"] is None
    etcd = doc["etcd"]
    assert isinstance(etcd, dict) and etcd["disconnected_for"] is None
