"""Shared fixtures, and the one check of what a test needs.

Tests say what they need with markers: ``netns`` (root, iproute2, network
namespaces; extra tools as arguments, e.g. ``pytest.mark.netns("iperf3")``) and
``etcd`` (a real etcd binary; extra tools as arguments, e.g.
``pytest.mark.etcd("etcdctl")``). A test that uses the ``lab`` fixture is a
``netns`` test and one that uses the ``etcd`` fixture an ``etcd`` test, marked
or not. :func:`pytest_runtest_setup` checks the markers before any fixture is
set up (module-scoped labs included), so a laptop skips with the reason instead
of failing, and ``pytest -m "not netns"`` runs everything that needs no root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator

import pytest

from benchmarks.etcd import EtcdServer, etcd_server
from benchmarks.lab import Lab

ETCD_PACKAGES = {"etcd": "etcd-server", "etcdctl": "etcd-client"}


def missing(markers: Iterable[pytest.Mark], is_root: bool) -> str | None:
    """Why a test with ``markers`` cannot run here, or None (the root and tools check)."""
    for mark in markers:
        if mark.name == "netns":
            if not is_root:
                return "needs root (network namespaces, TUN)"
            tools: tuple[str, ...] = ("ip", *mark.args)
        elif mark.name == "etcd":
            tools = ("etcd", *mark.args)
        else:
            continue
        for tool in tools:
            if shutil.which(tool) is None:
                package = ETCD_PACKAGES.get(tool, "iproute2" if tool == "ip" else tool)
                return f"needs {tool} (Debian package {package})"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use, so a lab test is always a netns test."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "lab" in names and item.get_closest_marker("netns") is None:
            item.add_marker(pytest.mark.netns)
        if "etcd" in names and item.get_closest_marker("etcd") is None:
            item.add_marker(pytest.mark.etcd)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    why = missing(item.iter_markers(), os.geteuid() == 0)
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A real etcd 3.4 (v2 enabled) on a free loopback port, removed afterwards."""
    with etcd_server() as server:
        yield server


@pytest.fixture
def lab() -> Iterator[Lab]:
    """An empty lab (core namespace only); add segments and hosts in the test."""
    with Lab() as the_lab:
        yield the_lab
