"""Durable totals for /metrics: what happened to jobs, by kind, and the submits each limit refused.

They are counted in the very transactions that submit, complete, fail, cancel, give back, retry and purge jobs,
so every job is counted once whichever process moved it (a worker, the supervisor recovering a lease, an app
submitting), nothing is lost when a process dies, and the figures survive restarts. Counts are aggregated in
Python first: one statement per transaction, however many jobs it moved.

One table, so that a transaction dirties one more page at most (its kind's rows sit together): a page is what a
commit pays for (~5 µs each here), more than the statement. job_totals(kind, event, n, seconds), events:
- `submitted`; `failed` (failed attempts, a dead job's last included); `dead`; `cancelled`;
- `done:<le>`: done jobs whose handler ran at most `le` seconds (the bucket's upper bound; not cumulative), and
  in `seconds` their durations summed. A kind's done total is its buckets' n summed;
- `released`: claims that ended with no outcome — a prefetched job given back unstarted, a job cancelled while
  held. Claims are not written when they happen (the claim is the hottest statement there is): every claim ends
  in exactly one of done, a failed attempt or a release, or is still processing, so the claims of a kind are
  those totals plus its jobs processing now (a count on the processing jobs' partial index);
- `left_done`, `left_dead`, `left_cancelled`: jobs that left a finished state (an operator's retry, a purge), so
  that the jobs in each finished state are a difference of totals — no count over the jobs table, which holds
  millions of finished rows and has no index on them.
limit_rejections(limit_key, n): submits refused by each limit, counted by a small write of its own after the
refused submit rolled back.

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
from typing import TYPE_CHECKING, Any

import apsw
import msgspec
import orjson

from cardq.errors import StoreError

if TYPE_CHECKING:
    from cardq.store.db import Database

OTHER = "(other)"  # the kind every kind past max_kinds is counted as
MAX_KINDS = 50  # the default of [metrics] max_kinds
# Upper bounds of the job duration buckets, in seconds: no-op jobs take microseconds, the card generator's
# upstream calls seconds to minutes (its request timeout is 12 s, a job's timeout 300 s).
DURATION_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   math.inf)
DONE = "done:"  # the prefix of the duration buckets' events: "done:0.005", ..., "done:inf"
_DONE_EVENTS = tuple(f"{DONE}{b!r}" for b in DURATION_BOUNDS)
EVENTS = ("submitted", "claimed", "failed", "dead", "cancelled")  # what a snapshot's totals hold
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
            if c.execute("SELECT EXISTS (SELECT 1 FROM job_totals WHERE kind = ?)", (kind,)).fetchall()[0][0]:
                got = kind
            else:
                n = c.execute("SELECT count(DISTINCT kind) FROM job_totals WHERE kind != ?", (OTHER,)).fetchall()[0][0]
                got = kind if n < self.max_kinds else OTHER
            if len(self.known) >= _KNOWN_MAX:
                self.known.clear()
            # (A transaction rolled back after this leaves the kind remembered without its row: it is counted as
            # itself the next time, which can pass max_kinds by the few kinds of such transactions — a bound
            # that stays a bound.)
            self.known[kind] = got
        return got


_ADD = ("INSERT INTO job_totals (kind, event, n, seconds) VALUES (?1, ?2, ?3, ?4)"
        " ON CONFLICT (kind, event) DO UPDATE SET n = n + ?3, seconds = seconds + ?4")


def add(c: apsw.Connection, labels: KindLabels, counts: Mapping[tuple[str, str], int]) -> None:
    """Add each (kind, event) -> n in the caller's transaction: one statement."""
    rows: dict[tuple[str, str], int] = {}
    for (kind, event), n in counts.items():
        if n:
            key = (labels.label(c, kind), event)
            rows[key] = rows.get(key, 0) + n
    if rows:
        c.executemany(_ADD, [(kind, event, n, 0.0) for (kind, event), n in rows.items()])


def add_done(c: apsw.Connection, labels: KindLabels, rows: Iterable[tuple[int, Any]],
             took: Mapping[int, tuple[str, float]] | None, now: float) -> None:
    """Count done jobs into their kind's duration buckets, in the caller's transaction (one statement). `rows`:
    (job id, _) for each job the completion marked done; `took[job id]`: (its kind, the seconds its handler ran),
    as the worker passes them. A job without one is looked up (one statement for them all): its duration is then
    the time since its claim."""
    # The worker's drain passes up to 256 jobs a transaction: this loop is the totals' whole cost per job, so it
    # is kept to a lookup, a bisect and a dict update (~0.3 µs a job here).
    bounds, find, get = DURATION_BOUNDS, bisect.bisect_left, (took or {}).get
    acc: dict[tuple[str, int], list] = {}
    missing = []
    for job_id, _ in rows:
        t = get(job_id)
        if t is None:
            missing.append(job_id)
            continue
        kind, s = t
        if s < 0.0:
            s = 0.0
        key = (kind, find(bounds, s))
        a = acc.get(key)
        if a is None:
            acc[key] = [1, s]
        else:
            a[0] += 1
            a[1] += s
    if missing:
        for kind, started in c.execute("SELECT kind, started_at FROM jobs WHERE id IN (SELECT value FROM"
                                       " json_each(?))", (orjson.dumps(missing).decode(),)):
            s = max(0.0, now - started) if started is not None else 0.0  # (0: a wall clock stepped back)
            a = acc.setdefault((kind, find(bounds, s)), [0, 0.0])
            a[0] += 1
            a[1] += s
    merged: dict[tuple[str, str], list] = {}
    for (kind, i), (n, s) in acc.items():
        key = (labels.label(c, kind), _DONE_EVENTS[i])
        m = merged.get(key)
        if m is None:
            merged[key] = [n, s]
        else:
            m[0] += n
            m[1] += s
    if merged:
        c.executemany(_ADD, [(kind, event, n, s) for (kind, event), (n, s) in merged.items()])


def left(status: str) -> str:
    """The event of a job leaving a finished state ("done", "dead", "cancelled")."""
    return _LEFT[status]


def count_rejection(db: Database, limit: str) -> None:
    """Count one submit refused by `limit`, in a transaction of its own (the submit's own was rolled back). Best
    effort: a database that takes no write now loses the count, never the caller's LimitExceeded."""
    with contextlib.suppress(StoreError):
        db.write(lambda c: add_rejection(c, limit), "count a limit rejection")


def add_rejection(c: apsw.Connection, limit: str) -> None:
    """Count one submit refused by `limit` in the caller's transaction (submit_many: after that submit's own
    savepoint was rolled back)."""
    c.execute("INSERT INTO limit_rejections (limit_key, n) VALUES (?, 1)"
              " ON CONFLICT (limit_key) DO UPDATE SET n = n + 1", (limit,))


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
    # event (submitted, claimed, failed, dead, cancelled) -> kind -> n; claimed = done + failed + released +
    # processing now (see the module's docstring)
    totals: dict[str, dict[str, int]]
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
        released: dict[str, int] = {}
        buckets: dict[str, dict[float, tuple[int, float]]] = {}
        counted: set[str] = set()  # kinds counted by name (the rest are OTHER's)
        for kind, event, n, seconds in c.execute("SELECT kind, event, n, seconds FROM job_totals"):
            counted.add(kind)
            if event.startswith(DONE):
                buckets.setdefault(kind, {})[float(event[len(DONE):])] = (n, seconds)
            elif event in totals:
                totals[event][kind] = n
            elif event in left_n:
                left_n[event] += n
            elif event == "released":
                released[kind] = n
        durations = {}
        for kind, rows in buckets.items():
            # The standard bounds, and any other a row was stored under (bounds changed since): a histogram keeps
            # every observation whatever its buckets.
            bounds = sorted(set(DURATION_BOUNDS) | rows.keys())
            durations[kind] = Histogram(bounds, [rows.get(b, (0, 0.0))[0] for b in bounds],
                                        sum(s for _, s in rows.values()))
        # (INDEXED BY: each on its partial index, which holds exactly the jobs in that state.)
        processing: dict[str, int] = {}
        for kind, n in c.execute("SELECT kind, count(*) FROM jobs INDEXED BY jobs_leased WHERE status = 'processing'"
                                 " GROUP BY kind"):
            label = kind if kind in counted else OTHER
            processing[label] = processing.get(label, 0) + n
        for kind in {*durations, *totals["failed"], *released, *processing}:
            totals["claimed"][kind] = (sum(durations[kind].counts) if kind in durations else 0) + \
                totals["failed"].get(kind, 0) + released.get(kind, 0) + processing.get(kind, 0)
        by_state = {
            "queued": c.execute("SELECT count(*) FROM jobs INDEXED BY jobs_ready WHERE status = 'queued'"
                                ).fetchall()[0][0],
            "scheduled": c.execute("SELECT count(*) FROM jobs INDEXED BY jobs_scheduled WHERE status = 'scheduled'"
                                   ).fetchall()[0][0],
            "processing": sum(processing.values()),
            "done": sum(sum(h.counts) for h in durations.values()) - left_n["left_done"],
            "dead": sum(totals["dead"].values()) - left_n["left_dead"],
            "cancelled": sum(totals["cancelled"].values()) - left_n["left_cancelled"],
        }
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
