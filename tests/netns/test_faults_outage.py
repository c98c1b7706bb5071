"""Fault: etcd away for 60 s under constant traffic, then back.

Two vxlan hosts, etcd v3, production lease settings (24 h TTL). etcd is stopped
for 60 s while a 5 pps ping and a TCP stream run between the containers and the
same ping runs between the hosts over the underlay. The agents keep their peers
and stay ready; not one overlay ping is lost beyond what the underlay loses; each
agent logs the outage once and the recovery once; after it, a lease written to
etcd is programmed. A second, quick test: a lease renewal due during an outage
warns once, not once per retry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

import pytest

from benchmarks.etcd import EtcdServer
from control.config import parse_config
from control.keeper import LeaseKeeper
from control.lease import LeaseAttrs
from control.registry import EtcdOptions, open_api
from tests.netns.test_faults_common import (
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

OUTAGE = 60.0


def test_sixty_second_etcd_outage_loses_no_ping() -> None:
    with world({"h1": "A", "h2": "A"}) as w:
        lab, cluster = w.lab, w.cluster
        h1, h2 = w.hosts["h1"], w.hosts["h2"]
        assert h1.container_ns and h2.container_ip and cluster.etcd is not None
        assert lab.wait_ping(h1.container_ns, h2.container_ip, deadline=20)
        since = {name: len(a.log()) for name, a in w.agents.items()}

        traffic = Traffic.start(lab, h1, h2, OUTAGE + 12)
        time.sleep(2)
        cluster.etcd.kill()  # data kept; back after OUTAGE
        down = time.monotonic()
        for name in ("h1", "h2"):
            cluster.wait_status(w.agent(name), lambda d: d["etcd"]["connected"] is False, 30,
                                f"{name} notices etcd is away")
        checks = 0
        while time.monotonic() - down < OUTAGE - 3:
            for name, agent in w.agents.items():  # peers kept, still ready
                assert w.peers(name) == [w.subnet("h2" if name == "h1" else "h1")]
                assert cluster.fetch(agent, "/readyz")[0] == 200
            checks += 1
            time.sleep(max(0.0, min(15.0, OUTAGE - 3 - (time.monotonic() - down))))
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))
        outage = time.monotonic() - down
        cluster.start_etcd()
        back = time.monotonic()
        reconnect = {}
        for name, agent in w.agents.items():
            cluster.wait_status(agent, lambda d: d["etcd"]["connected"] is True, 30,
                                f"{name} reconnects")
            reconnect[name] = time.monotonic() - back
        cluster.etcdctl("put", lease_key("10.7.80.0/24"),
                        lease_value("10.10.1.80", "02:00:00:00:00:80"))
        programmed = wait_for(lambda: all("10.7.80.0/24" in w.peers(n) for n in w.agents), 20,
                              "a lease written after the outage programmed")
        res = traffic.result()

        print(f"\netcd outage {outage:.1f} s: {res.summary()}; reconnected "
              + ", ".join(f"{n} {t:.1f} s" for n, t in reconnect.items())
              + f" after etcd restarted; new lease programmed {programmed:.1f} s later; "
              f"{checks} checks of peers and /readyz during the outage")
        assert res.overlay.lost <= res.underlay.lost, res.overlay.output
        assert res.tcp.longest_stall == 0.0 and res.tcp.bytes > 0, res.tcp
        for name, agent in w.agents.items():
            assert len(log_lines(agent, "etcd unreachable", since[name])) == 1, agent.log()
            assert len(log_lines(agent, "etcd reachable again", since[name])) == 1, agent.log()
            assert len(problems(agent, since[name])) == 1, agent.log()[since[name]:]
            assert cluster.status(agent)["etcd"]["reconnects"] >= 1
            assert agent.running
            no_traceback(agent)


def test_lease_renewal_during_an_outage_warns_once(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal due while etcd is away: one warning, retries at debug level only, and
    the lease (the same subnet) held again once etcd is back."""
    config = parse_config('{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}')
    attrs = LeaseAttrs(ipaddress.IPv4Address("10.10.1.1"), "vxlan", 1, bytes(6))

    async def go() -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network | None, int]:
        reg = open_api("v3", EtcdOptions(endpoints=(etcd.endpoint,), timeout=1.0))
        keeper = LeaseKeeper(reg, config, attrs, ttl=6, margin=5.5, clock=time.time)
        first = (await keeper.acquire()).subnet
        task = asyncio.ensure_future(keeper.run())  # renews about every 0.5 s
        try:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(etcd.kill)
            await asyncio.sleep(4.0)  # several renewals fail meanwhile
            await asyncio.to_thread(etcd.start)
            renewed = keeper.renewals
            deadline = time.monotonic() + 20
            while keeper.renewals == renewed and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return first, keeper.subnet, keeper.renewals - renewed
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await reg.close()
    with caplog.at_level(logging.DEBUG, logger="flannelette.lease"):
        first, now, renewals = asyncio.run(go())
    failed = [r for r in caplog.records if r.getMessage().startswith("lease renewal failed")]
    assert len(failed) >= 2, caplog.text  # it did retry
    assert [r.levelno for r in failed].count(logging.WARNING) == 1, caplog.text
    assert now == first and renewals >= 1, caplog.text
