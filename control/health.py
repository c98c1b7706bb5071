"""The agent's small HTTP server: /healthz, /readyz, /status, /metrics.

A few lines of HTTP/1.0 on ``asyncio.start_server`` (runs on uvloop): GET only,
one request per connection, bounded header read. Handlers are plain callables
returning (status, content type, body), so the documents are built by the
agent, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

log = logging.getLogger("flannelette.health")

Handler = Callable[[], tuple[int, str, bytes]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


class HealthServer:
    """Serve ``routes`` (path -> handler) on host:port."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Handler]) -> None:
        self.host = host
        self.port = port
        self._routes = dict(routes)
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
