"""/metrics text parses with prometheus-client's own parser and follows the status document."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from control import metrics


def _doc(tx: int) -> dict[str, Any]:
    return {
        "node": {"subnet": "10.244.1.0/24"},
        "peers": [
            {"subnet": "10.244.2.0/24", "path": "vxlan", "tx_packets": tx, "rx_packets": 2,
             "tx_bytes": tx * 100, "rx_bytes": 200},
            {"subnet": "10.244.3.0/24", "path": "direct"},
        ],
        "drops": {"bad_flags": 4, "unknown_peer": 1},
        "engine": {"tun_batch_max": 17, "flag": True},
        "etcd": {"connected": True, "reconnects": 2, "lease_expires_at": 1.7e9},
        "reconcile": {"operations": {"replace": 5, "delete": 1}},
    }


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move() -> None:
    doc = _doc(10)
    first = _samples(metrics.render(lambda: doc))
    key = ("flannelette_peer_transmit_packets_total",
           (("path", "vxlan"), ("peer_subnet", "10.244.2.0/24")))
    assert first[key] == 10
    assert first[("flannelette_dropped_packets_total", (("reason", "bad_flags"),))] == 4
    assert first[("flannelette_peers", (("path", "direct"),))] == 1
    assert first[("flannelette_etcd_up", ())] == 1
    assert first[("flannelette_etcd_reconnects_total", ())] == 2
    assert first[("flannelette_lease_expiry_timestamp_seconds", ())] == 1.7e9
    assert first[("flannelette_reconcile_operations_total", (("op", "replace"),))] == 5
    assert first[("flannelette_engine_tun_batch_max", ())] == 17
    assert ("flannelette_engine_flag", ()) not in first
    doc.update(_doc(25))
    assert _samples(metrics.render(lambda: doc))[key] == 25


def test_metrics_of_empty_document() -> None:
    samples = _samples(metrics.render(lambda: {"node": {}}))
    assert samples[("flannelette_etcd_up", ())] == 0
    assert samples[("flannelette_peers", (("path", "vxlan"),))] == 0
