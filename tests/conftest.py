"""Shared fixtures. Root-only tiers skip with a reason instead of failing on a laptop."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from benchmarks.etcd import EtcdServer, etcd_server
from benchmarks.lab import Lab


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TUN)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A real etcd 3.4 (v2 enabled) on a free loopback port, removed afterwards."""
    if shutil.which("etcd") is None:
        pytest.skip("needs etcd (Debian package etcd-server)")
    with etcd_server() as server:
        yield server


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An empty lab (core namespace only); add segments and hosts in the test."""
    _need_root()
    with Lab() as the_lab:
        yield the_lab
