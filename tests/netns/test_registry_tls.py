"""TLS to etcd (--etcd-cafile/--etcd-certfile/--etcd-keyfile), both APIs, real etcd.

The test makes its own CA and certificates with openssl and runs etcd on a free
loopback port with client-certificate authentication; everything is removed after.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from benchmarks.etcd import free_port
from control.config import parse_config
from control.errors import RegistryUnavailable
from control.keeper import LeaseKeeper
from control.lease import LeaseAttrs
from control.registry import EtcdOptions, discover, open_api

pytestmark = pytest.mark.etcd("etcdctl", "openssl")

PREFIX = "/coreos.com/network"
CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'


def _ssl(d: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def _certs(d: str) -> None:
    _ssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
         "ca.pem", "-days", "2", "-subj", "/CN=flannelette-test-ca")
    with open(os.path.join(d, "san.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _ssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}")
        _ssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf")


@pytest.fixture
def tls_etcd() -> Iterator[tuple[str, str]]:
    """(endpoint, cert dir) of an etcd that requires client certificates."""
    d = tempfile.mkdtemp(prefix="flannelette-tls-")
    proc = None
    try:
        _certs(d)
        port, peer = free_port(), free_port()
        endpoint = f"https://127.0.0.1:{port}"
        c = os.path.join
        proc = subprocess.Popen(
            ["etcd", "--name", "tls", "--data-dir", c(d, "data"),
             "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
             "--cert-file", c(d, "server.pem"), "--key-file", c(d, "server.key"),
             "--trusted-ca-file", c(d, "ca.pem"), "--client-cert-auth",
             "--enable-v2=true", "--log-level", "warn", "--logger", "zap"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            ok = subprocess.run(
                ["etcdctl", "--endpoints", endpoint, "--cacert", c(d, "ca.pem"), "--cert",
                 c(d, "client.pem"), "--key", c(d, "client.key"), "endpoint", "health"],
                capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=10)
            if ok.returncode == 0:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("TLS etcd did not come up")
            time.sleep(0.2)
        yield endpoint, d
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def _put_config(endpoint: str, d: str, api: int) -> None:
    c = os.path.join
    if api == 3:
        tls = ["--cacert", c(d, "ca.pem"), "--cert", c(d, "client.pem"), "--key",
               c(d, "client.key")]
        cmd = ["put", f"{PREFIX}/config", CONFIG]
    else:
        tls = ["--ca-file", c(d, "ca.pem"), "--cert-file", c(d, "client.pem"), "--key-file",
               c(d, "client.key")]
        cmd = ["set", f"{PREFIX}/config", CONFIG]
    subprocess.run(["etcdctl", "--endpoints", endpoint, *tls, *cmd], check=True,
                   capture_output=True, env={**os.environ, "ETCDCTL_API": str(api)}, timeout=20)


@pytest.mark.parametrize("api", [2, 3])
def test_tls_with_client_certificates(tls_etcd: tuple[str, str], api: int) -> None:
    endpoint, d = tls_etcd
    _put_config(endpoint, d, api)
    c = os.path.join
    good = EtcdOptions(endpoints=(endpoint,), prefix=PREFIX, cafile=c(d, "ca.pem"),
                       certfile=c(d, "client.pem"), keyfile=c(d, "client.key"), timeout=5.0)

    async def go() -> None:
        reg, text = await discover("auto", good)
        try:
            assert reg.api == f"v{api}" and text == CONFIG
            k = LeaseKeeper(reg, parse_config(text),
                            LeaseAttrs(ipaddress.IPv4Address("10.10.1.1"), "vxlan", 1, bytes(6)),
                            clock=time.time)
            lease = await k.acquire()
            snap = await reg.list_leases()
            assert [r.subnet for r in snap.leases] == [lease.subnet]
        finally:
            await reg.close()
        # Without a client certificate the server refuses us: "unavailable", retried.
        bad = open_api(f"v{api}", EtcdOptions(endpoints=(endpoint,), prefix=PREFIX,
                                              cafile=c(d, "ca.pem"), timeout=3.0))
        try:
            with pytest.raises(RegistryUnavailable):
                await bad.get_config()
        finally:
            await bad.close()
    asyncio.run(go())
