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
import threading
import time
import weakref
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
    if cut_at > now:  # a monotonic time from before a reboot (the file outlives it): no call started before it
        cut_at = 0.0
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
    """One client's handle on a gate's shared limit (a client is one thread's; close() may come from another)."""

    def __init__(self, path: Path):
        self.path = path
        self._file: tuple[int, mmap.mmap] | None = None  # the open file and its mapping
        self._finalizer: weakref.finalize | None = None  # closes them if this handle is dropped unclosed
        self._checked_at = 0.0  # when the file was last checked for having been deleted
        # record() against close(): a descriptor closed under a record could be reused by another file (a gate
        # slot) before its unlock, which would then unlock that file's permit.
        self._lock = threading.Lock()

    @classmethod
    def of_gate(cls, run_dir: Path, gate: str) -> AdaptiveLimit:
        return cls(gates_dir(run_dir) / f"{file_stem(gate)}.limit")

    def _mapped(self) -> tuple[int, mmap.mmap]:
        f = self._file
        if f is not None:
            now = time.monotonic()
            if now - self._checked_at < LINK_CHECK_S:  # (an fstat per call would be a third of its cost)
                return f
            self._checked_at = now
            if os.fstat(f[0]).st_nlink:
                return f
            self._drop()  # its file was deleted (the run directory removed and put back): use the new one
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size < _SIZE:
                    # Zeros: State() with limit 0, "never set". Written, not a sparse ftruncate: a store into an
                    # unallocated page of a mapping on a full disk is a SIGBUS, not an error we could catch.
                    os.pwrite(fd, bytes(_SIZE - size), size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            m = mmap.mmap(fd, _SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._file = (fd, m)
        self._finalizer = weakref.finalize(self, _close_file, fd, m)
        return self._file

    def read(self) -> State:
        return State(*_RECORD.unpack_from(self._mapped()[1]))

    def current(self, lo: int, hi: int) -> int:
        """The limit in effect now (no lock: a torn read still gives a value within [lo, hi])."""
        return effective(_RECORD.unpack_from(self._mapped()[1])[0], lo, hi)

    def record(self, lo: int, hi: int, started: float, outcome: str, latency_ms: float
               ) -> tuple[int, int, str] | None:
        """Apply one outcome; (old limit, new limit, why) when the whole-number limit changed, else None."""
        with self._lock:
            fd, m = self._mapped()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                old = State(*_RECORD.unpack_from(m))
                new, why = step(old, lo, hi, started, time.monotonic(), outcome, latency_ms)
                _RECORD.pack_into(m, 0, *new)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)  # (inside the try: an interrupt right after the lock is taken must
                # not leave every other holder's record() blocked; unlocking a lock not held does nothing)
        before, after = effective(old.limit or lo, lo, hi), effective(new.limit, lo, hi)
        return (before, after, why or "") if before != after else None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        self._file = None
        if self._finalizer is not None:
            self._finalizer()  # closes the mapping and the descriptor, once
            self._finalizer = None


def _close_file(fd: int, m: mmap.mmap) -> None:
    with contextlib.suppress(BufferError, ValueError):
        m.close()
    with contextlib.suppress(OSError):
        os.close(fd)


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
