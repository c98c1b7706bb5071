"""Prometheus metrics, derived from the agent's status document.

One source of truth: the agent already assembles a `/status` document (node,
peers with counters and path, drops by reason, etcd state, engine and
reconcile figures). A custom collector turns that document into metric
families at scrape time, so no counter is kept twice and nothing per packet
touches prometheus-client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

StatusSource = Callable[[], Mapping[str, Any]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PEER_COUNTERS = (
    ("tx_packets", "flannelette_peer_transmit_packets_total",
     "Packets sent towards a peer subnet"),
    ("rx_packets", "flannelette_peer_receive_packets_total",
     "Packets received from a peer"),
    ("tx_bytes", "flannelette_peer_transmit_bytes_total", "Bytes sent towards a peer subnet"),
    ("rx_bytes", "flannelette_peer_receive_bytes_total", "Bytes received from a peer"),
)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class StatusCollector(Collector):
    """Collects metric families from a fresh status document at every scrape."""

    def __init__(self, source: StatusSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        doc = self._source()
        yield from peer_metrics(doc)
        yield from node_metrics(doc)


def peer_metrics(doc: Mapping[str, Any]) -> Iterator[Metric]:
    """Per-peer traffic counters (labels: peer subnet, path) and the peer count by path."""
    peers = doc.get("peers") or []
    families = {key: CounterMetricFamily(name, text, labels=["peer_subnet", "path"])
                for key, name, text in _PEER_COUNTERS}
    by_path: dict[str, int] = {}
    for peer in peers:
        labels = [str(peer.get("subnet", "")), str(peer.get("path", ""))]
        by_path[labels[1]] = by_path.get(labels[1], 0) + 1
        for key, family in families.items():
            family.add_metric(labels, _num(peer.get(key)))
    yield from families.values()
    count = GaugeMetricFamily("flannelette_peers", "Known peers by forwarding path",
                              labels=["path"])
    for path in ("vxlan", "direct", "unreachable"):
        count.add_metric([path], by_path.get(path, 0))
    yield count


def node_metrics(doc: Mapping[str, Any]) -> Iterator[Metric]:
    """Drops by reason, engine batch figures, lease expiry, etcd health, reconcile work."""
    drops = CounterMetricFamily("flannelette_dropped_packets_total",
                                "Packets dropped by the dataplane, by reason", labels=["reason"])
    for reason, count in sorted((doc.get("drops") or {}).items()):
        drops.add_metric([str(reason)], _num(count))
    yield drops

    yield from engine_metrics(doc.get("engine") or {})

    etcd: Mapping[str, Any] = doc.get("etcd") or {}
    yield GaugeMetricFamily("flannelette_etcd_up", "1 when the registry answers, else 0",
                            value=1.0 if etcd.get("connected") else 0.0)
    yield CounterMetricFamily("flannelette_etcd_reconnects_total",
                              "Times the registry connection was lost and regained",
                              value=_num(etcd.get("reconnects")))
    expires = etcd.get("lease_expires_at")
    if isinstance(expires, (int, float)):
        yield GaugeMetricFamily("flannelette_lease_expiry_timestamp_seconds",
                                "When our subnet lease expires (Unix time)", value=expires)

    reconcile: Mapping[str, Any] = doc.get("reconcile") or {}
    ops = CounterMetricFamily("flannelette_reconcile_operations_total",
                              "Route operations applied by the reconciler", labels=["op"])
    for op, count in sorted((reconcile.get("operations") or {}).items()):
        ops.add_metric([str(op)], _num(count))
    yield ops


# Engine figures with a proper name: key -> (counter?, name, help, (label, value) or None).
_ENGINE: dict[str, tuple[bool, str, str, tuple[str, str] | None]] = {
    "tun_packets": (True, "flannelette_engine_packets_total",
                    "Packets the engine read, by source (tun: to tunnel, udp: from peers)",
                    ("source", "tun")),
    "udp_packets": (True, "flannelette_engine_packets_total", "", ("source", "udp")),
    "tun_wakeups": (True, "flannelette_engine_wakeups_total",
                    "Reader wake-ups, by source; packets_total / wakeups_total = mean batch",
                    ("source", "tun")),
    "udp_wakeups": (True, "flannelette_engine_wakeups_total", "", ("source", "udp")),
    "tun_max_batch": (False, "flannelette_engine_max_batch_packets",
                      "Largest batch drained in one wake-up since start, by source",
                      ("source", "tun")),
    "udp_max_batch": (False, "flannelette_engine_max_batch_packets", "", ("source", "udp")),
    "arp_replies": (True, "flannelette_engine_arp_replies_total",
                    "ARP requests for our subnet answered with our VtepMAC", None),
    "icmp_unreachable": (True, "flannelette_engine_icmp_unreachable_sent_total",
                         "ICMP host-unreachable sent for destinations without a peer", None),
    "rx_csum_partial": (True, "flannelette_engine_rx_checksum_partial_packets_total",
                        "Received packets handed to the kernel with a partial checksum", None),
    "rx_gso": (True, "flannelette_engine_rx_gso_packets_total",
               "Received oversize TCP packets handed to the kernel for segmentation", None),
    "tap_records": (True, "flannelette_tap_records_total",
                    "Records handed to captures and traces (flannelette capture/trace)", None),
    "tap_records_lost": (True, "flannelette_tap_records_lost_total",
                         "Capture/trace records lost to a full tap queue (traffic unaffected)",
                         None),
    "taps_active": (False, "flannelette_taps_active", "Captures and traces attached now", None),
}


def engine_metrics(engine: Mapping[str, Any]) -> Iterator[Metric]:
    """Engine counters and batch figures; unknown numeric figures become plain gauges."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    drops = CounterMetricFamily("flannelette_drops", "Packets dropped by the dataplane, by "
                                "reason, peer subnet ('-': none) and direction (tx/rx)",
                                labels=["reason", "peer", "direction"])
    for row in engine.get("peer_drops") or ():
        if isinstance(row, (list, tuple)) and len(row) == 4:
            drops.add_metric([str(row[0]), str(row[1]), str(row[2])], _num(row[3]))
    yield drops
    if engine.get("tx_path"):
        path = GaugeMetricFamily("flannelette_engine_tx_path", "How the engine sends: 1 for the "
                                 "path in use (tunnel-gso, tso-split+udp-gso, udp-gso, "
                                 "per-datagram)", labels=["path"])
        path.add_metric([str(engine["tx_path"])], 1.0)
        yield path
    for key, value in sorted(engine.items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        known = _ENGINE.get(key)
        if known is None:
            yield GaugeMetricFamily(f"flannelette_engine_{key}",
                                    f"Engine figure {key} (see docs/operations.md)", value=value)
            continue
        counter, name, text, label = known
        family = families.get(name)
        if family is None:
            text = text or next(t for c, n, t, _ in _ENGINE.values() if n == name and t)
            labels = [label[0]] if label else []
            family = (CounterMetricFamily(name, text, labels=labels) if counter
                      else GaugeMetricFamily(name, text, labels=labels))
            families[name] = family
        family.add_metric([label[1]] if label else [], float(value))
    yield from families.values()


def render(source: StatusSource) -> bytes:
    """The Prometheus text exposition of one status document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(source))
    return generate_latest(registry)
