"""Logging for `flannelette run`: one line per event that matters, as text or JSON lines.

Events worth a line (lease acquired/renewed/lost, peer added/changed/removed with
its path, etcd lost/regained, config found) are logged at INFO or WARNING by the
modules that see them; nothing per packet is ever logged. This module only
decides how the lines look and how loud the process is:

- ``--log-level debug|info|warning|error`` (``-v`` = debug), FLANNELD_LOG_LEVEL;
- ``--log-format text`` (default): ``2026-11-26T23:59:01.123Z INFO agent: message``;
- ``--log-format json``: one JSON object per line with ``ts`` (RFC 3339, UTC),
  ``level``, ``logger``, ``msg`` and, for a failure, ``exc`` (the traceback text), so
  journald/Loki/Elasticsearch need no parsing rules.

Client libraries (urllib3, python-etcd, aetcd, gRPC, pyroute2) log every failed
attempt; below debug they are silenced, because our own modules already say
once what went wrong and what is being retried.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
NOISY = ("urllib3", "etcd", "aetcd", "grpc", "pyroute2")

_STD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime"}


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: sortable, and the same on every node."""
    ms = int((created % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def _short(name: str) -> str:
    """`flannelette.agent` -> `agent`: the prefix is the same on every line."""
    return name.removeprefix("flannelette.")


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message>``; a traceback follows only for real failures."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record.created)} {record.levelname} {_short(record.name)}: "
                f"{record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields given to a log call are kept."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": _short(record.name),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Configure the root logger once for the process (replaces earlier handlers).

    ``level`` is one of :data:`LEVELS`, ``fmt`` one of :data:`FORMATS`; anything
    else is a programming error (the flag parser already restricts them).
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    quiet = logging.DEBUG if level == "debug" else logging.CRITICAL
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(quiet)
