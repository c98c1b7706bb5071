"""The backoff helper: exponential, capped, jittered, reset on success, clock injected."""

from __future__ import annotations

import random

from control.backoff import Backoff


def test_grows_jittered_and_capped() -> None:
    b = Backoff(base=0.1, cap=5.0, rng=random.Random(7))
    delays = [b.failure(now=10.0 + i) for i in range(12)]
    for i, d in enumerate(delays):
        ceiling = min(5.0, 0.1 * 2 ** i)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 5.0 and delays[-1] >= 2.5
    assert len(set(delays)) == len(delays)  # jittered


def test_success_resets_and_failing_for_uses_injected_clock() -> None:
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    assert b.failing_for(100.0) == 0.0
    b.failure(now=100.0)
    b.failure(now=103.0)
    assert b.failing_for(now=120.0) == 20.0
    b.success()
    assert b.failing_for(now=130.0) == 0.0
    assert 0.5 <= b.failure(now=131.0) <= 1.0
