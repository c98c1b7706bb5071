"""`flannelette run` flags: flanneld's names, FLANNELD_* variables, clear errors; the
peer conversion; the health server's HTTP on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.error
import urllib.request

import pytest

from control.agent import main
from control.config import BackendType
from control.errors import FlagError
from control.health import HealthServer
from control.lease import Lease, LeaseAttrs
from control.options import parse_args
from control.supervisor import peers_from_leases
from dataplane.fib import Path

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def test_defaults_are_flanneld_defaults() -> None:
    o = parse_args([], {})
    assert o.etcd.endpoints == ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    assert o.etcd.prefix == "/coreos.com/network" and o.etcd_api == "auto"
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.renew_margin == 3600.0 and o.lease_ttl == 86400
    assert (o.healthz_ip, o.healthz_port, o.ip_masq) == ("127.0.0.1", 9480, False)
    assert o.iface == () and o.public_ip is None and o.log_level == "info"
    # the fastest configuration by default (offload on, tunnel GSO where the kernel has it)
    assert o.engine_offload is True and o.tunnel_gso == "auto" and o.inner_source_check
    assert parse_args(["--engine-offload", "off"], {}).engine_offload is False
    assert parse_args([], {"FLANNELD_ENGINE_OFFLOAD": "off"}).engine_offload is False
    assert parse_args([], {"FLANNELD_TUNNEL_GSO": "off"}).tunnel_gso == "off"
    assert parse_args(["--inner-source-check", "off"], {}).inner_source_check is False


def test_flags() -> None:
    o = parse_args(["--etcd-endpoints", "http://10.0.0.1:2379,http://10.0.0.2:2379",
                    "--etcd-prefix", "/x/net", "--etcd-api", "v3", "--iface", "eth1",
                    "--iface", "10.1.1.1", "--public-ip", "10.9.9.9", "--subnet-file",
                    "/tmp/s.env", "--subnet-lease-renew-margin", "30", "--ip-masq",
                    "--healthz-port", "0", "-v", "--etcd-username", "u",
                    "--etcd-password", "p"], {})
    assert o.etcd.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert o.etcd.prefix == "/x/net" and o.etcd_api == "v3"
    assert o.iface == ("eth1", "10.1.1.1") and o.public_ip == A("10.9.9.9")
    assert o.subnet_file == "/tmp/s.env" and o.renew_margin == 1800.0
    assert o.ip_masq and o.healthz_port == 0 and o.log_level == "debug"
    assert (o.etcd.username, o.etcd.password) == ("u", "p")


def test_every_flag_from_the_environment() -> None:
    env = {"FLANNELD_ETCD_ENDPOINTS": "http://10.0.0.5:2379", "FLANNELD_ETCD_PREFIX": "/p",
           "FLANNELD_ETCD_API": "v2", "FLANNELD_IFACE": "eth9,10.2.2.2",
           "FLANNELD_PUBLIC_IP": "10.3.3.3", "FLANNELD_SUBNET_FILE": "/tmp/e.env",
           "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "10", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_HEALTHZ_IP": "127.0.0.2", "FLANNELD_HEALTHZ_PORT": "9999",
           "FLANNELD_ETCD_CAFILE": "/ca.pem", "FLANNELD_LOG_LEVEL": "warning"}
    o = parse_args([], env)
    assert o.etcd.endpoints == ("http://10.0.0.5:2379",) and o.etcd.prefix == "/p"
    assert o.etcd_api == "v2" and o.iface == ("eth9", "10.2.2.2")
    assert o.public_ip == A("10.3.3.3") and o.subnet_file == "/tmp/e.env"
    assert o.renew_margin == 600.0 and o.ip_masq
    assert (o.healthz_ip, o.healthz_port) == ("127.0.0.2", 9999)
    assert o.etcd.cafile == "/ca.pem" and o.etcd.tls and o.log_level == "warning"
    # A flag on the command line beats the environment.
    assert parse_args(["--etcd-api", "v3"], env).etcd_api == "v3"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--public-ip", "nope"], {}, "--public-ip must be an IPv4 address, got 'nope'"),
    (["--etcd-api", "v4"], {}, "invalid choice: 'v4'"),
    (["--healthz-port", "70000"], {}, "--healthz-port must be in 0..65535"),
    (["--etcd-endpoints", "ftp://x"], {}, "--etcd-endpoints: cannot use 'ftp://x'"),
    (["--subnet-lease-renew-margin", "2000"], {}, "--subnet-lease-renew-margin must be"),
    ([], {"FLANNELD_HEALTHZ_PORT": "abc"}, "bad FLANNELD_* value"),
    (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ([], {"FLANNELD_ETCD_API": "v5"}, "--etcd-api must be one of auto, v2, v3, got 'v5'"),
    ([], {"FLANNELD_ENGINE_OFFLOAD": "yes"}, "--engine-offload must be one of on, off"),
    ([], {"FLANNELD_LOG_FORMAT": "xml"}, "--log-format must be one of text, json"),
])
def test_bad_flags_are_one_clear_error(argv: list[str], env: dict[str, str],
                                       message: str) -> None:
    with pytest.raises(FlagError) as info:
        parse_args(argv, env)
    assert message in str(info.value)


def test_main_reports_bad_flag_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--public-ip", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flannelette run: --public-ip") and "Traceback" not in err


def test_peers_from_leases() -> None:
    mac = bytes([2, 0, 0, 0, 0, 7])
    leases = {N("10.5.2.0/24"): Lease(N("10.5.2.0/24"), LeaseAttrs(A("10.1.1.2"), "vxlan", 1,
                                                                    mac)),
              N("10.5.1.0/24"): Lease(N("10.5.1.0/24"), LeaseAttrs(A("10.1.1.1"), "vxlan", 1,
                                                                    mac))}
    peers = peers_from_leases(leases, BackendType.VXLAN)
    assert [(str(p.subnet), p.path, p.vtep_mac) for p in peers] == [
        ("10.5.1.0/24", Path.VXLAN, mac), ("10.5.2.0/24", Path.VXLAN, mac)]
    hostgw = peers_from_leases(
        {N("10.5.3.0/24"): Lease(N("10.5.3.0/24"), LeaseAttrs(A("10.1.1.3"), "host-gw"))},
        BackendType.HOST_GW)
    assert hostgw[0].path is Path.DIRECT and hostgw[0].vtep_mac is None


def test_health_server_serves_routes_on_loopback() -> None:
    async def go() -> None:
        server = HealthServer("127.0.0.1", 0, {
            "/status": lambda: (200, "application/json", json.dumps({"node": {}}).encode()),
            "/readyz": lambda: (503, "application/json", b'{"lease_held": false}'),
            "/boom": lambda: 1 / 0,  # type: ignore[dict-item, return-value]
        })
        await server.start()

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                            timeout=5) as r:
                    return int(r.status), bytes(r.read())
            except urllib.error.HTTPError as e:
                return int(e.code), bytes(e.read())
        try:
            assert await asyncio.to_thread(get, "/status") == (200, b'{"node": {}}')
            assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
            assert (await asyncio.to_thread(get, "/nope"))[0] == 404
            assert (await asyncio.to_thread(get, "/boom"))[0] == 500
        finally:
            await server.close()
    asyncio.run(go())
