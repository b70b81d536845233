"""Durable totals for /metrics: what happened to jobs, by kind, and the submits each limit refused.

They are counted in the very transactions that submit, claim, complete, fail, cancel, retry and purge jobs, so
every job is counted once whichever process moved it (a worker, the supervisor recovering a lease, an app
submitting), nothing is lost when a process dies, and the figures survive restarts. Counts are aggregated in
Python first: one upsert per (kind, event) — and per (kind, duration bucket) — per transaction, however many jobs
it moved (a worker's batch of 256 completions and 256 claims costs two statements here).

Tables (schema v6):
- job_totals(kind, event, n): events `submitted`, `claimed` (claims: a prefetched job given back unstarted was
  claimed too), `failed` (failed attempts, the last of a dead job's included), `dead`, `cancelled`; and
  `left_done`, `left_dead`, `left_cancelled`: jobs that left a finished state (an operator's retry, a purge).
  Those make the number of jobs in each finished state a difference of totals — no count over the jobs table,
  which holds millions of finished rows and has no index on them.
- job_durations(kind, le, n, seconds): done jobs by duration bucket (`le`, its upper bound in seconds; the counts
  are not cumulative) and the seconds they took. A kind's done total is its buckets' n summed.
- limit_rejections(limit_key, n): submits refused by each limit (counted by a small write of its own, after the
  refused submit rolled back).

Kinds are bounded: while fewer than `max_kinds` distinct kinds are counted a kind is counted as itself, after that
a new kind is counted as "(other)" (decided in the write transaction; cached per connection, since a kind once
counted stays counted).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import apsw
import msgspec

from cardq.errors import StoreError

if TYPE_CHECKING:
    from cardq.store.db import Database

OTHER = "(other)"  # the kind every kind past max_kinds is counted as
MAX_KINDS = 50  # the default of [metrics] max_kinds
# Upper bounds of the job duration buckets, in seconds: no-op jobs take microseconds, the card generator's
# upstream calls seconds to minutes (its request timeout is 12 s, a job's timeout 300 s).
DURATION_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   math.inf)
EVENTS = ("submitted", "claimed", "failed", "dead", "cancelled")
_LEFT = {"done": "left_done", "dead": "left_dead", "cancelled": "left_cancelled"}
_KNOWN_MAX = 10_000  # kinds remembered per connection (those counted as OTHER included) before starting afresh


class KindLabels:
    """kind -> the name it is counted under (itself, or OTHER past max_kinds), remembered per connection."""

    __slots__ = ("known", "max_kinds")

    def __init__(self, max_kinds: int = MAX_KINDS):
        self.max_kinds = max_kinds
        self.known: dict[str, str] = {}

    def label(self, c: apsw.Connection, kind: str) -> str:
        """Call inside the write transaction that counts it (the decision and the row are made together)."""
        got = self.known.get(kind)
        if got is None:
            counted = c.execute(
                "SELECT EXISTS (SELECT 1 FROM job_totals WHERE kind = ?1) OR EXISTS (SELECT 1 FROM job_durations"
                " WHERE kind = ?1)", (kind,)).fetchall()[0][0]
            if counted:
                got = kind
            else:
                n = c.execute("SELECT count(*) FROM (SELECT kind FROM job_totals UNION SELECT kind FROM job_durations)"
                              " WHERE kind != ?", (OTHER,)).fetchall()[0][0]
                got = kind if n < self.max_kinds else OTHER
            if len(self.known) >= _KNOWN_MAX:
                self.known.clear()
            # (A transaction rolled back after this leaves the kind remembered without its row: it is counted as
            # itself the next time, which can pass max_kinds by the few kinds of such transactions — a bound
            # that stays a bound.)
            self.known[kind] = got
        return got


_ADD = ("INSERT INTO job_totals (kind, event, n) VALUES (?1, ?2, ?3)"
        " ON CONFLICT (kind, event) DO UPDATE SET n = n + ?3")
_ADD_DURATIONS = ("INSERT INTO job_durations (kind, le, n, seconds) VALUES (?1, ?2, ?3, ?4)"
                  " ON CONFLICT (kind, le) DO UPDATE SET n = n + ?3, seconds = seconds + ?4")


def add(c: apsw.Connection, labels: KindLabels, counts: Mapping[tuple[str, str], int]) -> None:
    """Add each (kind, event) -> n, in the caller's transaction: one upsert per (label, event)."""
    rows: dict[tuple[str, str], int] = {}
    for (kind, event), n in counts.items():
        if n:
            key = (labels.label(c, kind), event)
            rows[key] = rows.get(key, 0) + n
    if rows:
        c.executemany(_ADD, [(kind, event, n) for (kind, event), n in rows.items()])


def add_durations(c: apsw.Connection, labels: KindLabels, done: Iterable[tuple[str, float]]) -> None:
    """Count done jobs, (kind, seconds) each, into their duration buckets, in the caller's transaction."""
    buckets: dict[tuple[str, int], list] = {}
    bounds = DURATION_BOUNDS
    for kind, seconds in done:
        seconds = max(seconds, 0.0)  # (a wall clock stepped back between claim and completion)
        key = (kind, bisect.bisect_left(bounds, seconds))
        b = buckets.get(key)
        if b is None:
            buckets[key] = [1, seconds]
        else:
            b[0] += 1
            b[1] += seconds
    rows: dict[tuple[str, int], list] = {}
    for (kind, i), (n, seconds) in buckets.items():
        key = (labels.label(c, kind), i)
        r = rows.get(key)
        if r is None:
            rows[key] = [n, seconds]
        else:
            r[0] += n
            r[1] += seconds
    if rows:
        c.executemany(_ADD_DURATIONS, [(kind, bounds[i], n, s) for (kind, i), (n, s) in rows.items()])


def left(status: str) -> str:
    """The event of a job leaving a finished state ("done", "dead", "cancelled")."""
    return _LEFT[status]


def count_rejection(db: Database, limit: str) -> None:
    """Count one submit refused by `limit`, in a transaction of its own (the submit's own was rolled back). Best
    effort: a database that takes no write now loses the count, never the caller's LimitExceeded."""
    with contextlib.suppress(StoreError):
        db.write(lambda c: c.execute(
            "INSERT INTO limit_rejections (limit_key, n) VALUES (?, 1)"
            " ON CONFLICT (limit_key) DO UPDATE SET n = n + 1", (limit,)), "count a limit rejection")


class Histogram(msgspec.Struct, frozen=True):
    """Raw histogram figures: counts[i] observations in (bounds[i-1], bounds[i]], the last bound +inf (counts are
    not cumulative), and the sum of the observed values."""

    bounds: list[float]
    counts: list[int]
    sum: float


class Figures(msgspec.Struct, frozen=True):
    """What /metrics reads from the store, from one snapshot."""

    jobs_by_state: dict[str, int]  # every status -> jobs in it now
    oldest_queued_age_s: float | None  # the oldest queued job's age (None: none queued)
    totals: dict[str, dict[str, int]]  # event (submitted, claimed, failed, dead, cancelled) -> kind -> n
    durations: dict[str, Histogram]  # kind -> its done jobs' durations (the done total is their count)
    limit_rejections: dict[str, int]  # limit key -> submits it refused
    inbox_events: int  # traffic events waiting in the durable inbox for the collector
    database_bytes: int  # the database file's size
    wal_bytes: int  # its write-ahead log's size


def snapshot(db: Database, *, now: float | None = None) -> Figures:
    """The totals, the jobs in each state, the oldest queued job's age, the inbox's depth and the files' sizes,
    from one read transaction. Cheap on a database of any size: no statement scans the jobs table (the active
    states are counted on their partial indexes; the finished ones are differences of totals)."""
    now = time.time() if now is None else now

    def tx(c: apsw.Connection) -> Figures:
        totals: dict[str, dict[str, int]] = {event: {} for event in EVENTS}
        left_n = dict.fromkeys(_LEFT.values(), 0)
        for kind, event, n in c.execute("SELECT kind, event, n FROM job_totals"):
            if event in totals:
                totals[event][kind] = n
            elif event in left_n:
                left_n[event] += n
        per_kind: dict[str, dict[float, tuple[int, float]]] = {}
        for kind, le, n, seconds in c.execute("SELECT kind, le, n, seconds FROM job_durations"):
            per_kind.setdefault(kind, {})[le] = (n, seconds)
        durations = {}
        for kind, rows in per_kind.items():
            # The standard bounds, and any other a row was stored under (bounds changed since): a histogram keeps
            # every observation whatever its buckets.
            bounds = sorted(set(DURATION_BOUNDS) | rows.keys())
            durations[kind] = Histogram(bounds, [rows.get(b, (0, 0.0))[0] for b in bounds],
                                        sum(s for _, s in rows.values()))
        by_state = {status: c.execute(f"SELECT count(*) FROM jobs WHERE status = '{status}'").fetchall()[0][0]
                    for status in ("queued", "scheduled", "processing")}  # (each on its partial index)
        by_state["done"] = sum(sum(h.counts) for h in durations.values()) - left_n["left_done"]
        by_state["dead"] = sum(totals["dead"].values()) - left_n["left_dead"]
        by_state["cancelled"] = sum(totals["cancelled"].values()) - left_n["left_cancelled"]
        # Ids grow with submit time, so the queued job with the smallest id is the oldest; INDEXED BY keeps SQLite
        # from walking the table in id order past every finished job to find it.
        oldest = c.execute("SELECT created_at FROM jobs WHERE id = (SELECT min(id) FROM jobs INDEXED BY jobs_ready"
                           " WHERE status = 'queued')").fetchall()
        return Figures(
            jobs_by_state=by_state,
            oldest_queued_age_s=max(0.0, now - oldest[0][0]) if oldest else None,
            totals=totals,
            durations=durations,
            limit_rejections=dict(c.execute("SELECT limit_key, n FROM limit_rejections").fetchall()),
            inbox_events=c.execute("SELECT count(*) FROM traffic_inbox").fetchall()[0][0],
            database_bytes=_size(db.path),
            wal_bytes=db.wal_bytes(),
        )

    return db.read(tx, "metrics")


def _size(path: os.PathLike) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
