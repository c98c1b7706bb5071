"""`flannelette status` against a real HTTP server on 127.0.0.1 and against nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.etcd import free_port
from control import status
from control.table import table

DOC = {
    "node": {"subnet": "10.244.1.0/24", "public_ip": "10.10.1.1", "backend": "vxlan",
             "vtep_mac": "2a:00:00:00:00:01", "mtu": 1450, "etcd_api": "v3"},
    "peers": [
        {"subnet": "10.244.2.0/24", "public_ip": "10.10.1.2", "vtep_mac": "2a:00:00:00:00:02",
         "path": "direct", "tx_packets": 0, "rx_packets": 0, "tx_bytes": 0, "rx_bytes": 0},
        {"subnet": "10.244.3.0/24", "public_ip": "10.10.2.1", "vtep_mac": "2a:00:00:00:00:03",
         "path": "vxlan", "tx_packets": 12, "rx_packets": 11, "tx_bytes": 3 * 1024 * 1024,
         "rx_bytes": 1000},
    ],
    "drops": {"unknown_peer": 3, "bad_flags": 0},
    "etcd": {"connected": True, "lease_expires_at": 2_000_000_000.0},
}


@pytest.fixture
def server() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(DOC).encode() if self.path == "/status" else b"{}"
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_table(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(["--healthz-port", str(server)]) == 0
    out = capsys.readouterr().out
    assert "10.244.1.0/24" in out and "etcd api     v3 (connected)" in out
    rows = [line for line in out.splitlines() if line.startswith("10.244.")]
    assert rows[0].split()[:4] == ["10.244.2.0/24", "10.10.1.2", "2a:00:00:00:00:02", "direct"]
    assert "12 / 3.0 MiB" in rows[1] and "vxlan" in rows[1]
    assert "unknown_peer" in out and "bad_flags" not in out


def test_json(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(["--healthz-port", str(server), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == DOC


def test_no_agent(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert status.main(["--healthz-port", str(port), "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "no flannelette agent answers" in err and str(port) in err


def test_render_disconnected_and_empty() -> None:
    text = status.render({"node": {"subnet": "10.5.1.0/24"},
                          "etcd": {"connected": False, "disconnected_for": 42}}, now=0.0)
    assert "DISCONNECTED for 42 s" in text and "no peers" in text and "drops: none" in text


def test_table_aligns_columns_and_strips_trailing_blanks() -> None:
    lines = table(["a", "bb"], [["xxx", ""], ["y", "z"]], indent="  ")
    assert lines == ["  a    bb", "  ---  --", "  xxx", "  y    z"]
