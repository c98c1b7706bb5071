"""tests/conftest.py's one check of what a test needs, without root."""

from __future__ import annotations

import pytest

from tests.conftest import missing


def test_netns_needs_root_then_ip_and_the_named_tools() -> None:
    assert missing([pytest.mark.netns.mark], is_root=False) == (
        "needs root (network namespaces, TUN)")
    assert missing([pytest.mark.netns.mark], is_root=True) in (
        None, "needs ip (Debian package iproute2)")
    why = missing([pytest.mark.netns("no-such-tool-xyz").mark], is_root=True)
    assert why is not None and why.startswith("needs ") and "root" not in why


def test_etcd_needs_no_root_but_its_tools() -> None:
    why = missing([pytest.mark.etcd("no-such-tool-xyz").mark], is_root=False)
    assert why is not None and why.startswith("needs ") and "root" not in why
    assert missing([pytest.mark.parametrize("x", [1]).mark], is_root=False) is None
