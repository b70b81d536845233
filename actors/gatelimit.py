"""An adaptive gate's limit: how many permits of max_concurrency are in use now, learned from the upstream's
answers by AIMD (additive increase, multiplicative decrease), as TCP does with its window.

- A drop — the block under the permit raised an overload (upstream 429/503/504, a timeout: any exception with
  `overload = True`, TimeoutError, a job timeout), or successes whose recent latency has risen to LATENCY_TOLERANCE
  times the usual (and by at least LATENCY_MIN_RISE_MS: a rise from 2 to 5 ms is noise, not an upstream in
  trouble) — cuts the limit to BACKOFF times itself, at least min_concurrency. Only a call that started after
  the last cut can cut again: the calls in flight when the upstream first pushed back all fail together, and
  they say one thing, not sixteen.
- A success raises it by 1/limit: one permit more per limit's worth of successes, about one per round of calls.
  Until the first drop it grows by 1 per success instead (slow start: doubling per round), so a fresh gate finds
  the upstream's capacity in a few rounds rather than one permit at a time. Never past max_concurrency.
- "The usual latency" is a slow moving average of successful calls (LONG_WEIGHT); "recent" a faster one
  (SHORT_WEIGHT: one slow call among quick ones does not cut, a run of them does). A latency cut forgets the
  recent average, so the next cut needs new evidence.

The state is shared by every holder — workers and apps, any process — through one small file,
<run_dir>/gates/G.limit, mapped into memory: reading the limit for a take is a load from the mapping, no system
call; an outcome is recorded under an exclusive flock() of that file (a few microseconds). It survives restarts
(what was learned is kept) and is clamped to the config in effect at every read, so an edited min or max applies
at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any, NamedTuple

from cardq.actors.gateslots import LINK_CHECK_S, file_stem, gates_dir

BACKOFF = 0.75  # a drop leaves this share of the limit
LATENCY_TOLERANCE = 2.0  # a success this many times slower than usual counts as a drop
LONG_WEIGHT = 0.005  # the usual latency: a moving average over about the last 200 successes
SHORT_WEIGHT = 0.1  # recent latency: about the last 10
LATENCY_MIN_RISE_MS = 50.0
LATENCY_MIN_SAMPLES = 20  # no latency judgement before the usual latency means something

# limit, long_ms, short_ms, cut_at (CLOCK_MONOTONIC, the same clock in every process), samples, cut_once,
# cuts, raises (totals since the file was made)
_RECORD = struct.Struct("<dddddddd")
_SIZE = 4096


class State(NamedTuple):
    limit: float = 0.0  # 0: never set (start at min_concurrency)
    long_ms: float = 0.0
    short_ms: float = 0.0
    cut_at: float = 0.0
    samples: float = 0.0
    cut_once: float = 0.0  # 0 until the first drop: slow start (a zero-filled file is a fresh state)
    cuts: float = 0.0
    raises: float = 0.0


def effective(limit: float, lo: int, hi: int) -> int:
    """The whole number of permits a fractional limit allows, within the configured bounds (any value read —
    an unset or half-written one included — gives a limit in range)."""
    if math.isnan(limit):
        return lo
    return int(max(lo, min(hi, limit)))


def step(s: State, lo: int, hi: int, started: float, now: float, outcome: str, latency_ms: float
         ) -> tuple[State, str | None]:
    """One outcome's effect: (the new state, why the limit moved, or None). `outcome` is "ok", "drop" or
    "ignore" (a failure that says nothing about the upstream's load: a bad request, a bug). Pure, so the rules
    are tested without processes. (Plain locals and one State() per return: this runs on every gated call.)"""
    limit, long_ms, short_ms, cut_at, samples, cut_once, cuts, raises = s
    if not lo <= limit <= hi:  # unset, or the bounds were edited
        limit = float(effective(limit or lo, lo, hi))
    if outcome == "ignore":
        return State(limit, long_ms, short_ms, cut_at, samples, cut_once, cuts, raises), None
    why = "upstream overloaded"
    if outcome == "ok":
        if samples:
            long_ms += LONG_WEIGHT * (latency_ms - long_ms)
            short_ms += SHORT_WEIGHT * (latency_ms - short_ms)
        else:
            long_ms = short_ms = latency_ms
        samples += 1
        slow = samples >= LATENCY_MIN_SAMPLES and short_ms > LATENCY_TOLERANCE * long_ms \
            and short_ms - long_ms >= LATENCY_MIN_RISE_MS
        if not slow:
            grown = min(float(hi), limit + (1.0 / limit if cut_once else 1.0))
            raises += int(grown) > int(limit)
            return State(grown, long_ms, short_ms, cut_at, samples, cut_once, cuts, raises), "healthy"
        if started < cut_at:  # slow, but in flight at the last cut: neither healthy nor news
            return State(limit, long_ms, short_ms, cut_at, samples, cut_once, cuts, raises), None
        why = f"latency {short_ms:.0f} ms, {short_ms / long_ms:.1f}x the usual {long_ms:.0f} ms"
        short_ms = long_ms
    if started < cut_at:  # in flight when the limit was last cut: already answered for
        return State(limit, long_ms, short_ms, cut_at, samples, cut_once, cuts, raises), None
    cut = max(float(lo), limit * BACKOFF)
    return State(cut, long_ms, short_ms, now, samples, 1.0, cuts + (int(cut) < int(limit)), raises), why


class AdaptiveLimit:
    """One process's (one thread's) handle on a gate's shared limit."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._checked_at = 0.0  # when the file was last checked for having been deleted

    @classmethod
    def of_gate(cls, run_dir: Path, gate: str) -> AdaptiveLimit:
        return cls(gates_dir(run_dir) / f"{file_stem(gate)}.limit")

    def _open(self) -> mmap.mmap:
        if self._map is not None:
            now = time.monotonic()
            if now - self._checked_at < LINK_CHECK_S:  # (an fstat per call would be a third of its cost)
                return self._map
            self._checked_at = now
            if os.fstat(self._fd).st_nlink:
                return self._map
        self.close()  # its file was deleted (the run directory removed and put back): use the new one
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _SIZE:
                    # Zeros: State() with limit 0, "never set". Allocated, not a sparse ftruncate: a store into
                    # an unallocated page of a mapping on a full disk is a SIGBUS, not an error we could catch.
                    os.posix_fallocate(fd, 0, _SIZE)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, _SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self._map

    def read(self) -> State:
        return State(*_RECORD.unpack_from(self._open()))

    def current(self, lo: int, hi: int) -> int:
        """The limit in effect now (no lock: a torn read still gives a value within [lo, hi])."""
        return effective(_RECORD.unpack_from(self._open())[0], lo, hi)

    def record(self, lo: int, hi: int, started: float, outcome: str, latency_ms: float
               ) -> tuple[int, int, str] | None:
        """Apply one outcome; (old limit, new limit, why) when the whole-number limit changed, else None."""
        m = self._open()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            old = State(*_RECORD.unpack_from(m))
            new, why = step(old, lo, hi, started, time.monotonic(), outcome, latency_ms)
            _RECORD.pack_into(m, 0, *new)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        before, after = effective(old.limit or lo, lo, hi), effective(new.limit, lo, hi)
        return (before, after, why or "") if before != after else None

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._map.close()
            self._map = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def outcome_of(error: BaseException | None) -> str:
    """What a permit's block ending with `error` (None: it returned) says about the upstream's load."""
    if error is None:
        return "ok"
    if getattr(error, "overload", False) or isinstance(error, TimeoutError):
        return "drop"
    return "ignore"


def describe(s: State, lo: int, hi: int) -> dict[str, Any]:
    """For diag gates / status."""
    return {"limit": effective(s.limit or lo, lo, hi), "latency_ms": round(s.long_ms, 1),
            "recent_latency_ms": round(s.short_ms, 1), "limit_cuts": int(s.cuts), "limit_raises": int(s.raises)}
