"""The agent's small HTTP server: /healthz, /readyz, /status, /metrics.

A few lines of HTTP/1.0 on ``asyncio.start_server`` (runs on uvloop): GET only,
one request per connection, bounded header read. Handlers are plain callables
returning (status, content type, body); :func:`document_routes` makes the
agent's four from a snapshot source, the documents themselves come from the pure
``control/statusdoc.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping

from control import metrics, statusdoc

log = logging.getLogger("flannelette.health")

Handler = Callable[[], tuple[int, str, bytes]]
# An async handler that writes the whole response itself (streams: capture, trace) from the
# query parameters; it may read ``reader`` to notice that the client went away.
StreamHandler = Callable[[Mapping[str, str], asyncio.StreamReader, asyncio.StreamWriter],
                         Awaitable[None]]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def response_head(status: int, ctype: str, length: int | None = None) -> bytes:
    """An HTTP/1.0 status line and headers; ``length`` None: the body ends at close."""
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"{size}Connection: close\r\n\r\n").encode()


def document_routes(snapshot: Callable[[], statusdoc.Snapshot],
                    clock: Callable[[], float] = time.monotonic) -> dict[str, Handler]:
    """/healthz, /readyz (503 until ready), /status and /metrics, each from a fresh
    snapshot taken at request time."""
    def status() -> tuple[int, str, bytes]:
        doc = statusdoc.status(snapshot(), clock())
        return 200, "application/json", json.dumps(doc, indent=1).encode()

    def readyz() -> tuple[int, str, bytes]:
        ready, doc = statusdoc.readiness(snapshot(), clock())
        return (200 if ready else 503), "application/json", json.dumps(doc).encode()

    def healthz() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def metrics_text() -> tuple[int, str, bytes]:
        return 200, metrics.CONTENT_TYPE, metrics.render(
            lambda: statusdoc.status(snapshot(), clock()))
    return {"/healthz": healthz, "/readyz": readyz, "/status": status, "/metrics": metrics_text}


class HealthServer:
    """Serve ``routes`` (path -> handler) and ``streams`` (path -> async handler) on host:port."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Handler],
                 streams: Mapping[str, StreamHandler] | None = None) -> None:
        self.host = host
        self.port = port
        self._routes = dict(routes)
        self._streams = dict(streams or {})
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        handler = self._routes.get(path.split("?", 1)[0])
        if handler is None:
            return 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        try:
            return handler()
        except Exception:
            log.exception("handler for %s failed", path)
            return 500, "text/plain", b"internal error\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            for _ in range(100):  # skip headers
                header = await asyncio.wait_for(reader.readline(), 5.0)
                if header in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) < 2:
                return
            path, _, query = parts[1].partition("?")
            stream = self._streams.get(path)
            if stream is not None and parts[0] == "GET":
                try:
                    await stream(dict(urllib.parse.parse_qsl(query)), reader, writer)
                except (TimeoutError, ConnectionError, OSError):
                    raise
                except Exception:
                    log.exception("stream handler for %s failed", path)
                return
            status, ctype, body = self._respond(parts[0], parts[1])
            head = (f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode() + (body if parts[0] != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
