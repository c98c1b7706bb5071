"""Fault: etcd answering slowly, not at all, or with garbage (through a TCP proxy).

h1's agent reaches etcd only through a small asyncio TCP proxy in the lab's core
namespace (this module run as a program); the test switches the proxy's mode
while traffic runs from h1's container to h2's (h2 talks to etcd directly):

1. ``delay 2``: every answer 2 s late (below the agent's 4 s request timeout):
   nothing to report, a new peer's lease is still programmed;
2. ``junk``: connections cut, every new one answered with garbage: one line
   "etcd unreachable", no crash;
3. ``pass``: one line "etcd reachable again", the removal written meanwhile applied;
4. ``delay 10``: answers later than any timeout: one line again, however many
   retries time out;
5. ``pass``: one line, the lease written meanwhile programmed.

Traffic is unaffected throughout; the agent logs one line per state change, never
one per retry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import Callable

import pytest

from benchmarks.cluster import REPO
from tests.netns.test_faults_common import (
    VXLAN,
    Traffic,
    lease_key,
    lease_value,
    log_lines,
    no_traceback,
    problems,
    wait_for,
    world,
)

pytestmark = [pytest.mark.netns("ping", "iperf3", "ss"), pytest.mark.etcd("etcdctl")]

PROXY_PORT = 23790
SLOW = 2.0  # s added to every answer: slow but inside the agent's timeout
STALLED = 10.0  # s: beyond any timeout
AGENT_FLAGS = ("--etcd-timeout", "4", "--watch-timeout", "5")  # a quiet watch probes at 5 s
DOWN, UP = "etcd unreachable", "etcd reachable again"


# ---- the proxy (run as a program in the core namespace) --------------------------------------
class Proxy:
    """Relays TCP to ``target``; ``mode_file`` says how: ``pass``, ``delay S`` (answers
    held S s, in order) or ``junk`` (open connections cut, new ones answered with
    random bytes). Read every 0.1 s."""

    def __init__(self, target: tuple[str, int], mode_file: str) -> None:
        self.target = target
        self.mode_file = mode_file
        self.mode = "pass"
        self.delay = 0.0
        self.conns: set[asyncio.StreamWriter] = set()
        self.rng = random.Random(13)

    async def follow_mode(self) -> None:
        last = ""
        while True:
            try:
                with open(self.mode_file) as f:
                    text = f.read().strip() or "pass"
            except OSError:
                text = "pass"
            if text != last:
                last = text
                words = text.split()
                self.mode, self.delay = words[0], float(words[1]) if len(words) > 1 else 0.0
                if self.mode == "junk":
                    for writer in list(self.conns):
                        writer.close()
            await asyncio.sleep(0.1)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        self.conns.add(writer)
        try:
            if self.mode == "junk":
                await self.junk(reader, writer)
            else:
                await self.relay(reader, writer)
        except OSError:
            pass
        finally:
            self.conns.discard(writer)
            writer.close()

    async def junk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x17\x03\x03 garbage, not etcd\r\n" + self.rng.randbytes(64))
        while data := await reader.read(65536):
            writer.write(self.rng.randbytes(len(data) % 200 + 16))
            await writer.drain()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        answers: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def to_etcd() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def from_etcd() -> None:
            while data := await up_reader.read(65536):
                answers.put_nowait((time.monotonic() + self.delay, data))
            answers.put_nowait((time.monotonic() + self.delay, b""))

        async def to_client() -> None:
            while True:
                due, data = await answers.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    return
                writer.write(data)
                await writer.drain()
        tasks = [asyncio.ensure_future(c) for c in (to_etcd(), from_etcd(), to_client())]
        try:
            await asyncio.wait([tasks[0], tasks[2]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], mode_file: str) -> None:
    proxy = Proxy(target, mode_file)
    server = await asyncio.start_server(proxy.handle, *listen)
    async with server:
        await asyncio.gather(server.serve_forever(), proxy.follow_mode())


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="a TCP proxy that delays or garbles answers")
    p.add_argument("--listen", required=True, help="host:port")
    p.add_argument("--target", required=True, help="host:port")
    p.add_argument("--mode-file", required=True)
    a = p.parse_args(argv)

    def addr(text: str) -> tuple[str, int]:
        host, port = text.rsplit(":", 1)
        return host, int(port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(addr(a.listen), addr(a.target), a.mode_file))


# ---- the test --------------------------------------------------------------------------------
def set_mode(path: str, mode: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(mode)
    os.replace(path + ".tmp", path)


@pytest.mark.parametrize("api", [2, 3])
def test_slow_stalled_and_garbage_etcd_one_line_per_state_change(api: int) -> None:
    with world({"h1": "A", "h2": "A"}, etcd=False) as w:
        lab, cluster = w.lab, w.cluster
        h1, h2 = w.hosts["h1"], w.hosts["h2"]
        etcd = cluster.start_etcd()
        cluster.set_config(VXLAN, api=api)
        gateway = str(h1.segment.gateway)
        mode = os.path.join(cluster.workdir, "proxy.mode")
        set_mode(mode, "pass")
        proxy = lab.popen(lab.core, sys.executable, "-m", "tests.netns.test_faults_etcd_slow",
                          "--listen", f"{gateway}:{PROXY_PORT}",
                          "--target", f"{gateway}:{etcd.port}", "--mode-file", mode,
                          cwd=REPO)
        wait_for(lambda: lab.run(lab.core, "ss", "-Hltn", f"sport = :{PROXY_PORT}"
                                 ).stdout.strip() != "", 10, "the proxy listening")
        a1 = cluster.start_agent(h1, "--etcd-endpoints", f"http://{gateway}:{PROXY_PORT}",
                                 *AGENT_FLAGS, api=f"v{api}", wait=False)
        a2 = cluster.start_agent(h2, api=f"v{api}", wait=False)
        w.agents.update(h1=a1, h2=a2)
        for agent in (a1, a2):
            cluster.wait_ready(agent, 60)
        w.wait_mesh()
        assert h1.container_ns and h2.container_ip
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        verb, rm = ("set", "rm") if api == 2 else ("put", "del")
        peer70, peer71 = "10.7.70.0/24", "10.7.71.0/24"

        def lines(text: str, since: int) -> list[str]:
            return log_lines(a1, text, since)

        def until(cond: Callable[[], object], timeout: float, what: str) -> float:
            try:
                return wait_for(cond, timeout, what)
            except AssertionError as exc:
                code, _ = cluster.fetch(a1, "/healthz", timeout=2.0)
                raise AssertionError(f"{exc}; h1 /healthz {code}; h1's log:\n"
                                     f"{a1.log()[-4000:]}") from None
        traffic = Traffic.start(lab, h1, h2, 36)
        timeline: list[str] = []
        t0 = time.monotonic()

        # 1. Slow: still connected, a new lease still programmed.
        since = len(a1.log())
        set_mode(mode, f"delay {SLOW}")
        time.sleep(1)
        cluster.etcdctl(verb, lease_key(peer70), lease_value("10.10.1.70", "02:00:00:00:00:70"),
                        api=api)
        took = until(lambda: peer70 in w.peers("h1"), 20, "a lease programmed while slow")
        timeline.append(f"slow ({SLOW:.0f} s per answer): new lease in /status after "
                        f"{took:.1f} s")
        time.sleep(max(0.0, 8 - (time.monotonic() - t0)))
        assert problems(a1, since) == [], a1.log()[since:]
        assert cluster.status(a1)["etcd"]["connected"] is True

        # 2. Garbage: one line.
        since = len(a1.log())
        set_mode(mode, "junk")
        took = until(lambda: lines(DOWN, since), 20, "the outage noticed")
        timeline.append(f"junk: noticed after {took:.1f} s")
        cluster.etcdctl(rm, lease_key(peer70), api=api)
        time.sleep(3)  # retries against garbage
        assert a1.running and cluster.status(a1)["etcd"]["connected"] is False
        # 3. Back: one line, the removal applied.
        set_mode(mode, "pass")
        took = until(lambda: lines(UP, since), 20, "etcd back")
        until(lambda: peer70 not in w.peers("h1"), 20, "the removal applied")
        timeline.append(f"pass: reachable again after {took:.1f} s")
        assert len(lines(DOWN, since)) == 1 and len(lines(UP, since)) == 1, a1.log()[since:]
        assert len(problems(a1, since)) == 1, a1.log()[since:]

        # 4. Stalled: answers later than any timeout; one line however many retries.
        since = len(a1.log())
        set_mode(mode, f"delay {STALLED}")
        cluster.etcdctl(verb, lease_key(peer71), lease_value("10.10.1.71", "02:00:00:00:00:71"),
                        api=api)
        took = until(lambda: lines(DOWN, since), 25, "the stall noticed")
        timeline.append(f"stalled ({STALLED:.0f} s per answer): noticed after {took:.1f} s")
        time.sleep(4)  # several timed-out retries
        # 5. Back: the lease written while stalled is programmed.
        set_mode(mode, "pass")
        took = until(lambda: lines(UP, since), 25, "etcd back")
        until(lambda: peer71 in w.peers("h1"), 20, "the lease written while stalled")
        timeline.append(f"pass: reachable again after {took:.1f} s")
        assert len(lines(DOWN, since)) == 1 and len(lines(UP, since)) == 1, a1.log()[since:]
        assert len(problems(a1, since)) == 1, a1.log()[since:]
        timeline.append(f"all phases {time.monotonic() - t0:.1f} s")

        res = traffic.result()
        state_lines = [line for line in a1.log().splitlines() if DOWN in line or UP in line]
        print(f"\netcd v{api} slow/junk/stalled: {'; '.join(timeline)}; {res.summary()}\n"
              + "\n".join(f"  h1: {line}" for line in state_lines))
        assert res.overlay.lost <= res.underlay.lost, res.overlay.output
        assert res.tcp.longest_stall == 0.0 and res.tcp.bytes > 0, res.tcp
        assert not log_lines(a1, "peer removed: 10.7.2.0/24"), a1.log()
        assert proxy.poll() is None
        for agent in (a1, a2):
            assert agent.running
            no_traceback(agent)


if __name__ == "__main__":
    main(sys.argv[1:])
