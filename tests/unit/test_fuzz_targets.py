"""The fuzz targets under hypothesis, the seed corpus replayed, the bugs fuzzing found
pinned, and (marker ``fuzz``) a bounded coverage-guided atheris run per target.

hypothesis drives every target with random bytes and with mutated corpus seeds on
a fixed example budget; tests/fuzz/run_atheris.py runs the long, coverage-guided
campaign (docs/operations.md, "Fuzzing").
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.config import parse_config
from control.errors import ConfigError, LeaseValueError, RegistryUnavailable
from control.etcd_v2 import EtcdV2Registry, parse_expiration
from control.lease import decode_attrs
from control.registry import EtcdOptions
from control.subnetenv import read_subnet
from dataplane import csum, wire
from dataplane.gro import Coalescer
from tests.fuzz import targets
from tests.fuzz.targets import TARGETS, is_known_bug

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")
NAMES = sorted(TARGETS)


def corpus(name: str) -> list[bytes]:
    d = os.path.join(CORPUS, name)
    out = []
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            out.append(fh.read())
    return out


def test_every_target_has_seeds() -> None:
    assert sorted(os.listdir(CORPUS)) == NAMES
    for name in NAMES:
        assert corpus(name), name


@pytest.mark.parametrize("name", NAMES)
def test_corpus_replays_clean(name: str) -> None:
    """Seeds (real frames, valid configs...) pass their target without any exception,
    known bugs included: a seed is a valid input."""
    for data in corpus(name):
        TARGETS[name](data)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes overwritten, inserted or cut: deep, slightly wrong input."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(max_size=8))
        elif op == 2:
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)


FUZZ_SETTINGS = settings(max_examples=120, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", NAMES)
@FUZZ_SETTINGS
@given(data=st.data())
def test_target_random_and_mutated(name: str, data: st.DataObject) -> None:
    """Random bytes and mutated seeds: no exception but the documented ones."""
    raw = data.draw(st.one_of(st.binary(max_size=600), mutated(corpus(name))))
    targets.run(name, raw)


# ---- bugs fuzzing found and fixed (regressions) ---------------------------------------

def test_deeply_nested_json_is_a_config_error_and_a_lease_error() -> None:
    """json.loads raised RecursionError out of parse_config/decode_attrs."""
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config("[" * 100_000)
    with pytest.raises(LeaseValueError, match="nested too deeply"):
        decode_attrs("{\"a\":" * 100_000)


def test_subnet_env_that_is_not_utf8_reads_as_absent(tmp_path: os.PathLike[str]) -> None:
    """read_subnet raised UnicodeDecodeError instead of 'unreadable: None'."""
    path = os.path.join(tmp_path, "subnet.env")
    with open(path, "wb") as f:
        f.write(b"FLANNEL_SUBNET=10.7.1.1/24\n\xff\xfe\n")
    assert read_subnet(path) is None


def test_etcd_expiration_that_is_no_date_is_none() -> None:
    """parse_expiration raised ValueError for a well-formed but impossible date."""
    assert parse_expiration("2026-13-45T99:99:99Z") is None
    assert parse_expiration("2026-11-27T10:00:00.5Z") == 1795773600.5


@pytest.mark.parametrize("status,body", [
    (500, b"\xff\xfe not utf-8"),  # python-etcd decodes error bodies as UTF-8
    (200, json.dumps({"action": "get", "node": {"key": "/coreos.com/network/subnets/"
                                                       "10.7.2.0-24", "value": "v",
                                                "modifiedIndex": "x"}}).encode()),
    (200, json.dumps({"action": "get", "node": {"key": "/k", "dir": True,
                                                "nodes": [7]}}).encode()),
])
def test_garbage_from_etcd_v2_is_unavailable_not_a_crash(status: int, body: bytes) -> None:
    """Something else answering on etcd's port: RegistryUnavailable (back off, retry)."""
    reg = EtcdV2Registry(EtcdOptions(endpoints=("http://127.0.0.1:2379",)))
    fake = targets._FakeV2Client(status, body, b"5")
    reg._client = lambda read_timeout: fake  # type: ignore[method-assign]

    async def all_calls() -> None:
        for call in (reg.list_leases(), reg.watch_leases(1, 1.0), reg.get_config_rev()):
            with pytest.raises(RegistryUnavailable, match=r"127\.0\.0\.1:2379"):
                await call
    asyncio.run(all_calls())


# ---- bugs the fuzzers found, now fixed: regression tests --------------------------------

def _held_and_short() -> tuple[Coalescer, memoryview]:
    """A coalescer holding a TCP segment, and a 20-byte TCP/IPv4 packet of the same
    addresses with no TCP header (passes wire.check_ipv4), as an exact-size view: what
    the last, shorter datagram of a UDP GRO batch from a (spoofed) peer looks like."""
    from tests.fuzz.make_corpus import ip_tcp
    held = bytearray(ip_tcp(100))
    g = Coalescer()
    assert Coalescer.can_start(held, 0, len(held), 1450)
    g.start(held, 0, len(held))
    short = bytearray(held[:20])
    short[2:4] = (20).to_bytes(2, "big")
    short[10:12] = b"\0\0"
    short[10:12] = csum.internet_checksum(short[:20]).to_bytes(2, "big")
    assert wire.check_ipv4(short, 0, 20, 1450) is wire.Frame.IPV4
    return g, memoryview(short)


def test_known_bug_filter_knows_no_open_bug() -> None:
    assert not is_known_bug(IndexError("elsewhere"))


def test_gro_append_of_a_segment_shorter_than_its_tcp_header_is_refused() -> None:
    g, short = _held_and_short()
    assert g.append(short, 0, 20) is False


def _held_tiny_tcp_header() -> tuple[Coalescer, bytes]:
    """A coalescer holding a TCP segment whose data offset is 1 (a 4-byte "header"),
    and the VXLAN datagram of that segment, to be repeated as a UDP GRO batch."""
    from tests.fuzz.make_corpus import ip_tcp
    seg = bytearray(ip_tcp(100))
    seg[20 + 12] = 0x10  # data offset 1
    assert wire.check_ipv4(seg, 0, len(seg), 1450) is wire.Frame.IPV4
    g = Coalescer()
    if Coalescer.can_start(seg, 0, len(seg), 1450):
        g.start(seg, 0, len(seg))
    return g, targets.PREFIX + bytes(seg)


def test_gro_refuses_a_tcp_header_shorter_than_20_bytes() -> None:
    g, d = _held_tiny_tcp_header()
    off, taken, _ = g.extend(memoryview(d + d), 0, 2 * len(d), len(d), targets.PREFIX)
    assert (off, taken) == (0, 0) and g.ip_len == 0


# ---- coverage-guided, bounded (CI) ----------------------------------------------------

@pytest.mark.fuzz
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris missing")
def test_atheris_every_target_briefly(tmp_path: os.PathLike[str]) -> None:
    """Each target 4 s under atheris (about a minute in all): no new crash."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run_atheris", "--all", "4",
         "--artifacts", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if " execs " in ln]
    assert len(lines) == len(NAMES), proc.stdout
    for ln in lines:
        assert ln.endswith(" ok") and int(ln.split()[1]) > 0, ln
    assert not os.listdir(tmp_path)
