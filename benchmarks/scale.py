"""Control-plane scale: N leases in a real etcd, then one agent; how fast and how big."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any


def run(leases: str, *, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure v2 and v3 at each lease count; "not_done" while the agent is missing."""
    if importlib.util.find_spec("control.agent") is None:
        return {"status": "not_done", "reason": "control.agent (flannelette run) is not in "
                "the tree yet"}
    return {"status": "not_done", "reason": "pending"}
