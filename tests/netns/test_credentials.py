"""Credentials never leak: the etcd password and key files' contents appear in no log
line, no /status or /metrics document and no error message.

Three agents against a real etcd with auth enabled (v3 users and roles): one with
the right password (from FLANNELD_ETCD_PASSWORD, as a unit's EnvironmentFile gives
it), one with a wrong password on the command line, one with TLS files whose
contents are secret strings (not valid PEM) against a plain-HTTP etcd. Each log,
and the documents of the one that comes up, are searched for every secret.
"""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.cluster import AgentProcess, Cluster
from benchmarks.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

VXLAN = '{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}'
ROOT_PW = "r00t-Pw-7f3a9c"
GOOD_PW = "s3cret-Pw-5d81e2"
BAD_PW = "wr0ng-Pw-c41b07"
KEY_SECRET = "KEY-CONTENTS-9e2d44b1"
CERT_SECRET = "CERT-CONTENTS-71a0c3fe"
CA_SECRET = "CA-CONTENTS-3b6f20d8"
SECRETS = (ROOT_PW, GOOD_PW, BAD_PW, KEY_SECRET, CERT_SECRET, CA_SECRET)


def enable_auth(cluster: Cluster) -> None:
    """root and flannel users; flannel may read and write the prefix only."""
    for args in (("user", "add", f"root:{ROOT_PW}", "--interactive=false"),
                 ("user", "add", f"flannel:{GOOD_PW}", "--interactive=false"),
                 ("role", "add", "flannel"),
                 ("role", "grant-permission", "flannel", "--prefix=true", "readwrite",
                  "/coreos.com/network/"),
                 ("user", "grant-role", "flannel", "flannel"),
                 ("auth", "enable")):
        cluster.etcdctl(*args)
    cluster.etcdctl("--user", f"root:{ROOT_PW}", "put", "/coreos.com/network/config", VXLAN)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def run_briefly(cluster: Cluster, agent: AgentProcess, seconds: float) -> str:
    """Let a failing agent retry for a while, stop it, return its whole output."""
    time.sleep(seconds)
    cluster.stop_agent(agent)
    return agent.log()


def test_etcd_password_and_key_contents_never_in_logs_status_or_errors(lab: Lab) -> None:
    lab.add_segment("A", "10.10.1.0/24")
    h1 = lab.add_host("h1", "A", "10.7.1.0/24")
    h2 = lab.add_host("h2", "A", "10.7.2.0/24")
    h3 = lab.add_host("h3", "A", "10.7.3.0/24")
    with Cluster(lab) as cluster:
        cluster.start_etcd()
        enable_auth(cluster)

        # Right password (environment): it works, and nothing shows it.
        good = cluster.start_agent(h1, "--etcd-username", "flannel", "--etcd-api", "v3",
                                   "--log-level", "debug",
                                   env={"FLANNELD_ETCD_PASSWORD": GOOD_PW})
        doc = cluster.status(good)
        assert doc["node"]["subnet"] == "10.7.1.0/24"
        with open(f"/proc/{good.proc.pid}/cmdline", "rb") as f:
            assert GOOD_PW.encode() not in f.read()  # the environment keeps it off `ps`
        code, body = cluster.fetch(good, "/status")
        assert code == 200 and not leaks(body), leaks(body)
        metrics = cluster.metrics(good)
        assert not leaks(metrics), leaks(metrics)
        for path in ("/healthz", "/readyz", "/nonexistent"):
            assert not leaks(cluster.fetch(good, path)[1])

        # Wrong password (flag): refused by etcd, retried, never echoed.
        bad = cluster.start_agent(h2, "--etcd-username", "flannel", "--etcd-password", BAD_PW,
                                  "--etcd-api", "auto", "--log-level", "debug", wait=False)
        # TLS files with secret contents against plain-HTTP etcd (v2 and v3 tried).
        files = {}
        for name, secret in (("key", KEY_SECRET), ("cert", CERT_SECRET), ("ca", CA_SECRET)):
            files[name] = os.path.join(cluster.workdir, f"etcd-{name}.pem")
            with open(files[name], "w") as f:
                f.write(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
        tls = cluster.start_agent(h3, "--etcd-keyfile", files["key"], "--etcd-certfile",
                                  files["cert"], "--etcd-cafile", files["ca"],
                                  "--etcd-username", "flannel", "--etcd-password", BAD_PW,
                                  "--log-level", "debug", wait=False)
        bad_log = run_briefly(cluster, bad, 8.0)
        tls_log = run_briefly(cluster, tls, 0.5)
        assert "10.7.2.0/24" not in bad_log, bad_log  # it did not get in
        for log in (bad_log, tls_log):
            assert log.strip(), "the agent said nothing about its failure"
            assert not leaks(log), (leaks(log), log[-3000:])
        good_log = run_briefly(cluster, good, 0.0)
        assert "lease acquired" in good_log and not leaks(good_log), leaks(good_log)
