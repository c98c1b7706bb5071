"""The one retry policy: exponential, capped, fully jittered, with an injected clock.

Pure: it computes delays and remembers since when things have been failing
(``/readyz`` reports that); the caller does the sleeping, so tests drive it
with a fake clock and a seeded rng. Every retry loop in control/ uses it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays base, 2*base, 4*base ... capped at ``cap``, each jittered into [d/2, d].

    flannel backs off 100 ms up to 5 s on etcd errors; those are the defaults.
    """

    base: float = 0.1
    cap: float = 5.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0
    failing_since: float | None = None

    def failure(self, now: float) -> float:
        """Record a failure at ``now``; return how long to wait before the next try."""
        if self.failing_since is None:
            self.failing_since = now
        ceiling = min(self.cap, self.base * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return ceiling / 2 + self.rng.random() * ceiling / 2

    def success(self) -> None:
        """Record a success: the next failure starts again from ``base``."""
        self.attempts = 0
        self.failing_since = None

    def failing_for(self, now: float) -> float:
        """Seconds since the first failure of the current streak (0 when healthy)."""
        return 0.0 if self.failing_since is None else now - self.failing_since
