"""`flannelette status`: a readable view of a running agent's /status document.

The agent serves the document on its healthz address (default 127.0.0.1:9480);
this command only fetches and formats it, so it works against any agent version
that keeps the documented fields, and it never needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from control.table import table


class StatusError(RuntimeError):
    """No agent answered, or it answered something that is not a status document."""


def fetch(host: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
    """GET /status from the agent; raise StatusError with a message a user can act on."""
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise StatusError(f"the agent at {url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(
            f"no flannelette agent answers at {url} ({reason}); is `flannelette run` "
            f"running, and with --healthz-ip {host} --healthz-port {port}?") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(f"{url} did not return JSON") from None
    if not isinstance(doc, dict) or "node" not in doc:
        raise StatusError(f"{url} did not return a flannelette status document")
    return doc


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


def _when(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "-"
    left = ts - now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    if left >= 0:
        return f"{stamp} (in {left / 3600:.1f} h)"
    return f"{stamp} (expired {-left / 3600:.1f} h ago)"


def render(doc: Mapping[str, Any], now: float) -> str:
    """The status document as text: node, peers (one row each), drops by reason."""
    node: Mapping[str, Any] = doc.get("node") or {}
    etcd: Mapping[str, Any] = doc.get("etcd") or {}
    connected = etcd.get("connected")
    health = "connected" if connected else ("DISCONNECTED" if connected is False else "-")
    if not connected and etcd.get("disconnected_for") is not None:
        health += f" for {float(etcd['disconnected_for']):.0f} s"
    if int(etcd.get("reconnects") or 0):
        health += f", {int(etcd['reconnects'])} reconnects"
    backend = str(node.get("backend", "-"))
    if node.get("direct_routing"):
        backend += " + DirectRouting"
    lines = [
        "node",
        f"  subnet       {node.get('subnet', '-')}",
        f"  public ip    {node.get('public_ip', '-')}"
        + (f" ({node['iface']})" if node.get("iface") else ""),
        f"  backend      {backend}",
        f"  vtep mac     {node.get('vtep_mac') or '-'}",
        f"  mtu          {node.get('mtu', '-')}",
    ]
    if node.get("network"):
        lines.append(f"  network      {node['network']}")
    lines += [
        f"  etcd api     {node.get('etcd_api', '-')} ({health})",
        f"  lease until  {_when(etcd.get('lease_expires_at'), now)}",
        "",
    ]
    peers: Sequence[Mapping[str, Any]] = doc.get("peers") or []
    if peers:
        rows = [[
            str(p.get("subnet", "-")), str(p.get("public_ip", "-")),
            str(p.get("vtep_mac") or "-"), str(p.get("path", "-")),
            f"{int(p.get('tx_packets', 0))} / {_human_bytes(float(p.get('tx_bytes', 0)))}",
            f"{int(p.get('rx_packets', 0))} / {_human_bytes(float(p.get('rx_bytes', 0)))}",
        ] for p in sorted(peers, key=lambda p: str(p.get("subnet", "")))]
        lines += table(["peer subnet", "public ip", "vtep mac", "path", "tx pkts / bytes",
                         "rx pkts / bytes"], rows)
    else:
        lines.append("no peers")
    drops: Mapping[str, Any] = doc.get("drops") or {}
    nonzero = {k: int(v) for k, v in drops.items() if int(v)}
    lines.append("")
    if nonzero:
        lines.append("drops")
        lines += [f"  {reason:<24} {count}" for reason, count in sorted(nonzero.items())]
    else:
        lines.append("drops: none")
    engine: Mapping[str, Any] = doc.get("engine") or {}
    figures = [(k, v) for k, v in sorted(engine.items())
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if figures:
        lines.append("")
        lines.append("engine")
        lines += [f"  {key:<24} {value}" for key, value in figures]
    warnings: Sequence[str] = doc.get("warnings") or []
    if warnings:
        lines.append("")
        lines.append("warnings")
        lines += [f"  {w}" for w in warnings]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Entry point of `flannelette status`."""
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="flannelette status", description=__doc__)
    parser.add_argument("--healthz-ip", default=env("FLANNELD_HEALTHZ_IP", "127.0.0.1"),
                        help="the agent's --healthz-ip (default 127.0.0.1)")
    parser.add_argument("--healthz-port", type=int,
                        default=int(env("FLANNELD_HEALTHZ_PORT", "9480")),
                        help="the agent's --healthz-port (default 9480)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        doc = fetch(args.healthz_ip, args.healthz_port, args.timeout)
    except StatusError as exc:
        print(f"flannelette status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(doc, time.time()))
    return 0
