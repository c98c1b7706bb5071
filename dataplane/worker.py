"""One engine worker process of a pool (``python -m dataplane.worker``; see dataplane/workers.py).

It reads ``init`` (config, peer set, taps) from its channel, runs one Engine with
``shared_devices=True`` on uvloop, and then serves the parent: peer sets, tap
subscriptions, snapshot requests, stop. Every ``interval`` seconds it pushes its
counters and any new flight-recorder records; while a tap is attached it drains
the tap's queue every 20 ms and sends the records. It stops on ``stop``, when the
channel closes (the parent is gone), on SIGTERM (also what ``PR_SET_PDEATHSIG``
sends when the parent dies) and ignores SIGINT (a terminal's Ctrl-C reaches the
whole process group; the parent stops its workers itself). The last counters go
to the parent before the devices close.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from dataplane.engine import Engine, EngineConfig
from dataplane.errors import DataplaneError
from dataplane.tap import TapSubscriber
from dataplane.workers import (
    Message,
    config_from_wire,
    drop_to_wire,
    encode,
    filter_from_wire,
    peers_from_wire,
    read_message,
    tap_to_wire,
)

PR_SET_PDEATHSIG = 1
TAP_POLL = 0.02
TERM_GRACE = 2.0
EngineFactory = Callable[[EngineConfig], Engine]


class WorkerServer:
    """The worker's side of the protocol over one started engine (no process, no loop
    of its own: :func:`serve` drives it; tests drive it with a fake-device engine)."""

    def __init__(self, engine: Engine, send: Callable[[Message], None]) -> None:
        self.engine = engine
        self._send = send
        self.taps: dict[int, TapSubscriber] = {}
        self._lost: dict[int, int] = {}
        self._recorded = 0
        self._last_drop_ns = 0
        self.stopped = False

    def handle(self, msg: Message) -> None:
        op = msg["op"]
        if op == "peers":
            self.engine.set_peers(peers_from_wire(msg["peers"]))
        elif op == "tap_add":
            self.add_tap(int(msg["id"]), msg["filter"])
        elif op == "tap_remove":
            sub = self.taps.pop(int(msg["id"]), None)
            self._lost.pop(int(msg["id"]), None)
            if sub is not None:
                self.engine.remove_tap(sub)
        elif op == "snapshot":
            self.push_stats(seq=msg.get("seq"))
        elif op == "stop":
            self.stopped = True

    def add_tap(self, tap_id: int, flt: dict[str, Any]) -> None:
        sub = TapSubscriber(filter=filter_from_wire(flt))
        self.taps[tap_id] = sub
        self._lost[tap_id] = 0
        self.engine.add_tap(sub)

    def push_stats(self, seq: object = None) -> None:
        """Counters, plus flight-recorder records newer than the last push."""
        rec = self.engine.recorder
        drops: list[tuple[Any, ...]] = []
        if rec.recorded != self._recorded:
            self._recorded = rec.recorded
            new = [r for r in rec.records() if r.ts_ns > self._last_drop_ns]
            if new:
                self._last_drop_ns = new[-1].ts_ns
                drops = [drop_to_wire(r) for r in new]
        msg: Message = {"op": "stats", "stats": self.engine.snapshot().to_dict(), "drops": drops}
        if seq is not None:
            msg["seq"] = seq
        self._send(msg)

    def flush_taps(self) -> None:
        """Send what every attached tap queued since the last flush."""
        for tap_id, sub in self.taps.items():
            records = sub.drain()
            lost = sub.lost - self._lost[tap_id]
            if records or lost:
                self._lost[tap_id] = sub.lost
                self._send({"op": "tap", "id": tap_id,
                            "records": [tap_to_wire(r) for r in records], "lost": lost})


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies; exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent and os.getppid() != parent:
        sys.exit(0)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                make_engine: EngineFactory = Engine, *, parent: int = 0,
                signals: bool = False) -> int:
    """Serve one parent on (reader, writer) until stopped; the exit status.

    SIGTERM while the parent lives waits up to ``TERM_GRACE`` s for its ``stop`` (a
    signal to the whole group, as systemd sends, is then one orderly stop, not a
    worker death the parent would count).
    """
    def send(msg: Message) -> None:
        if not writer.is_closing():
            writer.write(encode(msg))

    init = await read_message(reader)
    if init is None or init["op"] != "init":
        return 2
    try:
        engine = make_engine(config_from_wire(init["config"]))
        engine.set_peers(peers_from_wire(init["peers"]))
        await engine.start()
    except (DataplaneError, ValueError) as e:
        send({"op": "error", "error": str(e)})
        await _drain(writer)
        return 2
    server = WorkerServer(engine, send)
    for t in init.get("taps") or ():
        server.add_tap(int(t["id"]), t["filter"])
    interval = float(init.get("interval", 0.25))
    stop = asyncio.Event()
    term = asyncio.Event()
    loop = asyncio.get_running_loop()
    if signals:
        loop.add_signal_handler(signal.SIGTERM, term.set)
    send({"op": "ready", "pid": os.getpid(), "tun": engine.tun_name, "tx_path": engine.tx_path,
          "tunnel": engine.tunnel_reason})
    server.push_stats()

    async def commands() -> None:
        try:
            while not server.stopped:
                msg = await read_message(reader)
                if msg is None:
                    break
                server.handle(msg)
        finally:  # EOF, stop, or a message that is not ours: the parent is not talking sense
            stop.set()

    async def ticks() -> None:
        next_stats = loop.time() + interval
        while True:
            await asyncio.sleep(TAP_POLL if server.taps else max(0.0, next_stats - loop.time()))
            server.flush_taps()
            if loop.time() >= next_stats:
                server.push_stats()
                next_stats = loop.time() + interval

    tasks = [asyncio.create_task(commands()), asyncio.create_task(ticks())]
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(term.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if term.is_set() and not stop.is_set() and parent and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TERM_GRACE)
    finally:
        for t in (*tasks, *waits):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ConnectionError, OSError):
            server.flush_taps()
            server.push_stats()
        await engine.close()
        await _drain(writer)
    return 0


async def _drain(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def _main(fd: int, parent: int) -> int:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    return await serve(reader, writer, parent=parent, signals=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m dataplane.worker",
                                description="an engine worker of `--workers N` (internal)")
    p.add_argument("--fd", type=int, required=True, help="the channel to the parent")
    p.add_argument("--parent", type=int, default=0, help="the parent's pid")
    p.add_argument("--index", type=int, default=0, help="the worker's slot (for ps)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(args.parent)
    import uvloop

    return int(uvloop.run(_main(args.fd, args.parent)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
