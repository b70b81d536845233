"""An actor's own figures for /metrics, kept in memory since its process started (a restart starts them again at
zero, which Prometheus reads as a counter reset): counters, and histograms of durations. The "stats" op every
actor answers (actors/server.py) hands them out; the public API collects them over the actors' sockets at scrape
time (cardq/api.py Queue.metrics).

What a message changes in the database counts only once its batch has committed: counts made while handling a
batch wait in `pending` until commit(); a batch that fails drops them (discard()), as its changes were dropped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

# Seconds: an ask in the actor takes tens of microseconds to a commit's few milliseconds; a gate wait, up to the
# gate's queue_timeout_ms (12 s by default).
ASK_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
WAIT_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Observations by bucket (counts[i]: values in (bounds[i-1], bounds[i]]; the last, past every bound, is the
    +Inf bucket; not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """n observations of `value` (a batch of n asks that each waited as long)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def to_dict(self) -> dict[str, Any]:
        """As JSON can carry it (no infinity: the +Inf bucket is the count past the last bound)."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class Telemetry:
    """Counters by key (a tuple of strings) and histograms by key, with counts held back until commit."""

    __slots__ = ("counts", "histograms", "pending", "pending_obs")

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.histograms: dict[tuple[str, ...], Histogram] = {}
        self.pending: Counter[tuple[str, ...]] = Counter()
        self.pending_obs: list[tuple[tuple[str, ...], tuple[float, ...], float]] = []

    def count(self, *key: str, n: int = 1) -> None:
        """Count n of `key` once the batch commits."""
        self.pending[key] += n

    def observe(self, key: tuple[str, ...], bounds: tuple[float, ...], value: float) -> None:
        """Observe `value` in histogram `key` once the batch commits."""
        self.pending_obs.append((key, bounds, value))

    def observe_now(self, key: tuple[str, ...], bounds: tuple[float, ...], value: float, n: int = 1) -> None:
        """Observe at once: for what is measured after the commit (an ask's time in the actor)."""
        h = self.histograms.get(key)
        if h is None:
            h = self.histograms[key] = Histogram(bounds)
        h.observe(value, n)

    def commit(self) -> None:
        if self.pending:
            self.counts.update(self.pending)
            self.pending.clear()
        if self.pending_obs:
            for key, bounds, value in self.pending_obs:
                self.observe_now(key, bounds, value)
            self.pending_obs.clear()

    def discard(self) -> None:
        self.pending.clear()
        self.pending_obs.clear()

    def to_dict(self) -> dict[str, Any]:
        """{"counts": [[key..., n], ...], "histograms": [[key..., histogram], ...]} (keys as lists: JSON has no
        tuples for dict keys)."""
        return {"counts": [[*k, n] for k, n in self.counts.items()],
                "histograms": [[*k, h.to_dict()] for k, h in self.histograms.items()]}
