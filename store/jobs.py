"""The job state machine for workers: claim, extend, complete, fail, recover.

    queued ──claim──▶ processing ──complete──▶ done
      ▲                 │  │
      │   (retry, run_at │  └─fail (permanent, or out of attempts)──▶ dead
      │    = backoff)    ▼
      └──promote──── scheduled

A claim gives each job a fresh random lease token; complete, fail and extend must present it, so a holder whose
lease expired and whose job was claimed again (or recovered, or cancelled) changes nothing: `LeaseLost`.
Every function here runs in one IMMEDIATE transaction: each either happens whole or not at all — the counts it
adds to the durable totals (done jobs and their durations, failed attempts, dead jobs, claims given back, by kind:
store/totals.py) included.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import apsw
import orjson

from cardq.errors import LeaseLost
from cardq.store import counters, totals, usage
from cardq.store.db import Database

ERROR_TEXT_MAX = 500  # characters kept of one error message
ERROR_HISTORY_MAX = 25  # entries kept in a job's error history (the newest)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job as a worker holds it. `token` fences every later call about it."""

    id: int
    user_id: str
    plan: str
    kind: str
    payload: bytes  # JSON text of an object; decode with orjson when needed
    attempt: int  # 1 for the first attempt
    max_attempts: int
    token: int
    lease_until: float


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: delay = uniform(0, min(max_s, base_s * 2**(attempt-1)))."""

    base_s: float = 2.0
    max_s: float = 300.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_s, self.base_s * 2 ** min(attempt - 1, 60)))


@dataclass(frozen=True, slots=True)
class FailOutcome:
    status: str  # "scheduled" (will retry at run_at), "queued" (retry now) or "dead"
    run_at: float | None


_CLAIM = (
    "UPDATE jobs SET status = 'processing', attempts = attempts + 1, lease_owner = ?1, lease_token = ?2,"
    " lease_until = ?3, started_at = ?4, updated_at = ?5 WHERE id {} (SELECT id FROM jobs WHERE status = 'queued'"
    " ORDER BY priority DESC, vt, id LIMIT ?6)"
    " RETURNING id, user_id, plan, kind, payload, attempts, max_attempts, priority, vt"
)
# `= (subquery)` lets SQLite update in one pass; `IN` materializes the ids first, which only pays off for k > 1.
_CLAIM_ONE = _CLAIM.format("=")
_CLAIM_MANY = _CLAIM.format("IN")


def claim(db: Database, owner: str, *, k: int = 1, lease_s: float, horizon_s: float | None = None,
          now: float | None = None) -> list[Claimed]:
    """Atomically move up to k runnable jobs to processing for `owner`, in claim order (see store/fairness.py).

    No job is ever handed to two claimers: the select and the update are one statement under the write lock.
    Jobs in backoff whose run_at has come are promoted to queued first, in the same transaction — and so are
    those whose run_at is further than `horizon_s` (the longest backoff) away: only a wall clock stepped back
    (NTP, a VM restored) puts one there, and it must not wait that step out.
    """
    return finish_and_claim(db, [], owner, k=k, lease_s=lease_s, horizon_s=horizon_s, now=now)[1]


def finish_and_claim(db: Database, done: list[tuple[int, int, Any]], owner: str, *, k: int, lease_s: float,
                     horizon_s: float | None = None, now: float | None = None,
                     took: Mapping[int, tuple[str, float]] | None = None) -> tuple[list[int], list[Claimed]]:
    """complete_many(done, took=took) and claim(k) in ONE transaction: a worker's results and its next jobs for the
    price of one commit. Returns (ids whose lease was lost, the claimed jobs). `horizon_s`: see `claim`."""
    now = time.time() if now is None else now
    token = secrets.randbits(62) + 1
    until = now + lease_s
    batch = _encode_done(done) if done else ""
    day = db.days.key(now) if done else ""

    def tx(c: apsw.Connection) -> tuple[list[int], list[tuple]]:
        lost = _complete_tx(c, db, done, batch, now, day, took) if done else []
        c.execute(
            "UPDATE jobs SET status = 'queued', updated_at = ?1 WHERE status = 'scheduled'"
            " AND (run_at <= ?1 OR run_at > ?2)",
            (now, now + horizon_s if horizon_s is not None else float("inf")),
        )
        # (Claims are not counted here: see store/totals.py, "released".)
        return lost, c.execute(_CLAIM_ONE if k == 1 else _CLAIM_MANY, (owner, token, until, now, now, k)).fetchall()

    lost, rows = db.write(tx, "claim")
    rows.sort(key=lambda r: (-r[7], r[8], r[0]))
    return lost, [Claimed(r[0], r[1], r[2], r[3], r[4], r[5], r[6], token, until) for r in rows]


def extend(db: Database, jobs: list[tuple[int, int]], *, lease_s: float, now: float | None = None) -> set[int]:
    """Push the lease of each (job_id, token) to now + lease_s; returns the ids still held.

    An id missing from the answer was taken over (recovered, cancelled or reclaimed): its holder should stop.
    """
    now = time.time() if now is None else now

    def tx(c: apsw.Connection) -> set[int]:
        held = set()
        for job_id, token in jobs:
            c.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ? AND lease_token = ?",
                (now + lease_s, now, job_id, token),
            )
            if c.changes():
                held.add(job_id)
        return held

    return db.write(tx, "extend lease")


def complete(db: Database, job_id: int, token: int, result: Any = None, *, now: float | None = None) -> None:
    """Mark a held job done with its result; raises LeaseLost (changing nothing) if the lease was taken over."""
    lost = complete_many(db, [(job_id, token, result)], now=now)
    if lost:
        raise LeaseLost(f"job {job_id}: lease lost (it was recovered, cancelled or claimed again); result discarded")


def complete_many(db: Database, done: list[tuple[int, int, Any]], *, now: float | None = None,
                  took: Mapping[int, tuple[str, float]] | None = None) -> list[int]:
    """Mark each held (job_id, token, result) done, in one transaction; returns the ids whose lease was lost.

    Also counts each done job in its user's usage for the local day (the daily plan limits), the upstream tokens
    a result reports (`_meta.usage.total_tokens`, as the card generator's do) in `tokens:<user>:<day>`, and its
    duration in its kind's totals: `took[job_id]` = (its kind, the seconds its handler ran), as the worker knows
    them, else the time since its claim.
    """
    now = time.time() if now is None else now
    day = db.days.key(now)
    batch = _encode_done(done)
    return db.write(lambda c: _complete_tx(c, db, done, batch, now, day, took), "complete")


def _encode_done(done: list[tuple[int, int, Any]]) -> str:
    return orjson.dumps([[job_id, token, result] for job_id, token, result in done]).decode()


def _complete_tx(c: apsw.Connection, db: Database, done: list[tuple[int, int, Any]], batch: str, now: float,
                 day: str, took: Mapping[int, tuple[str, float]] | None) -> list[int]:
    rows = c.execute(_COMPLETE, (batch, now)).fetchall()
    if rows:
        usage.record_done(c, Counter(r[1] for r in rows), day)
        totals.add_done(c, db.kinds, rows, took, now)
    tokens = _tokens(done)
    if tokens:
        per_user: Counter[str] = Counter()
        for job_id, user in rows:
            per_user[counters.tokens_key(user, day)] += tokens.get(job_id, 0)
        counters.add_in(c, {key: n for key, n in per_user.items() if n}, now)
    finished = {r[0] for r in rows}
    return [job_id for job_id, _, _ in done if job_id not in finished]


def _tokens(done: list[tuple[int, int, Any]]) -> dict[int, int]:
    """job id -> the upstream tokens its result reports in `_meta.usage.total_tokens` (only those that do)."""
    out = {}
    for job_id, _, result in done:
        if type(result) is dict and "_meta" in result:
            meta = result["_meta"]
            used = meta.get("usage") if isinstance(meta, dict) else None
            n = used.get("total_tokens") if isinstance(used, dict) else None
            if type(n) is int and n > 0:
                out[job_id] = n
    return out


# One statement for the whole batch: the (id, token, result) triples travel as one JSON array.
_COMPLETE = (
    "UPDATE jobs SET status = 'done', result = j.value -> 2, finished_at = ?2, updated_at = ?2,"
    " lease_owner = NULL, lease_token = NULL, lease_until = NULL"
    " FROM json_each(?1) AS j WHERE jobs.id = j.value ->> 0 AND jobs.lease_token = j.value ->> 1"
    " RETURNING jobs.id, jobs.user_id"
)


def fail(db: Database, job_id: int, token: int, error: str, *, permanent: bool = False, backoff: Backoff,
         rng: random.Random | None = None, now: float | None = None, not_before_s: float = 0.0) -> FailOutcome:
    """Record a failed attempt of a held job: retry after backoff (and no sooner than `not_before_s` from now: an
    upstream's Retry-After), or dead when permanent or out of attempts.

    The error is kept as last_error and appended to the job's error history. Raises LeaseLost if not held.
    """
    now = time.time() if now is None else now
    rng = rng or random.Random()

    def tx(c: apsw.Connection) -> FailOutcome:
        rows = c.execute(
            "SELECT attempts, max_attempts, user_id, kind, errors FROM jobs WHERE id = ? AND lease_token = ?",
            (job_id, token),
        ).fetchall()
        if not rows:
            raise LeaseLost(f"job {job_id}: lease lost (it was recovered, cancelled or claimed again); "
                            "failure not recorded")
        attempts = rows[0][0]
        tally: Counter[tuple[str, str]] = Counter()
        out = _fail_held(c, db, job_id, *rows[0], error, permanent=permanent,
                         delay=max(not_before_s, backoff.delay(attempts, rng)), now=now, tally=tally)
        totals.add(c, db.kinds, tally)
        return out

    return db.write(tx, "fail")


def _fail_held(c: apsw.Connection, db: Database, job_id: int, attempts: int, max_attempts: int, user_id: str,
               kind: str, errors: str, error: str, *, permanent: bool, delay: float, now: float,
               tally: Counter[tuple[str, str]]) -> FailOutcome:
    """Shared by fail and recover: the job is processing and `attempts` have been made. The failed attempt (and
    the job's death) is added to `tally`, for the caller to write to the totals once per transaction."""
    error = error[:ERROR_TEXT_MAX]
    history = orjson.loads(errors)
    history = [*history, {"attempt": attempts, "at": round(now, 3), "error": error}][-ERROR_HISTORY_MAX:]
    if permanent or attempts >= max_attempts:
        outcome = FailOutcome("dead", None)
        c.execute(
            "UPDATE jobs SET status = 'dead', last_error = ?, errors = ?, finished_at = ?, updated_at = ?,"
            " lease_owner = NULL, lease_token = NULL, lease_until = NULL WHERE id = ?",
            (error, orjson.dumps(history).decode(), now, now, job_id),
        )
        usage.add_active(c, {user_id: -1})
    else:
        run_at = now + delay
        outcome = FailOutcome("scheduled" if delay > 0 else "queued", run_at)
        c.execute(
            "UPDATE jobs SET status = ?, run_at = ?, last_error = ?, errors = ?, updated_at = ?,"
            " lease_owner = NULL, lease_token = NULL, lease_until = NULL WHERE id = ?",
            (outcome.status, run_at, error, orjson.dumps(history).decode(), now, job_id),
        )
    usage.record_failure(c, db.days.key(now), dead=outcome.status == "dead")
    tally[(kind, "failed")] += 1
    if outcome.status == "dead":
        tally[(kind, "dead")] += 1
    return outcome


@dataclass(frozen=True, slots=True)
class Recovered:
    requeued: int
    dead: int

    @property
    def total(self) -> int:
        return self.requeued + self.dead


def recover(db: Database, *, processing_timeout_s: float, live_owners: Sequence[str] = (),
            now: float | None = None) -> Recovered:
    """Take back jobs whose lease expired, or that have been processing longer than processing_timeout_s
    (job_processing_timeout_seconds: a backstop for a holder that keeps renewing a lease on a hung job).

    A lease of one of `live_owners` (holders known to be alive: the caller's own workers, whose death it
    handles itself) never counts as expired: a wall clock that jumps forward (NTP, a VM resume) must not take
    running jobs from live workers. Each recovered job counts as a failed attempt: back to queued at once (the
    expiry was delay enough), or dead when it was the last attempt. The old holder's token stops working.
    """
    now = time.time() if now is None else now
    live = orjson.dumps(list(live_owners)).decode()

    def tx(c: apsw.Connection) -> Recovered:
        rows = c.execute(
            "SELECT id, attempts, max_attempts, user_id, kind, errors, expired FROM (SELECT *, lease_until < ?1"
            " AND lease_owner NOT IN (SELECT value FROM json_each(?3)) AS expired FROM jobs"
            " WHERE status = 'processing') WHERE expired OR started_at < ?2",
            (now, now - processing_timeout_s, live),
        ).fetchall()
        dead = 0
        tally: Counter[tuple[str, str]] = Counter()
        for *job, expired in rows:
            reason = "lease expired (worker stopped or lost)" if expired else (
                f"processing longer than job_processing_timeout_seconds={processing_timeout_s:g}")
            out = _fail_held(c, db, *job, reason, permanent=False, delay=0, now=now, tally=tally)
            dead += out.status == "dead"
        totals.add(c, db.kinds, tally)
        return Recovered(len(rows) - dead, dead)

    return db.write(tx, "recover")


def give_back(db: Database, held: list[tuple[int, int]], *, now: float | None = None) -> int:
    """Return held (job_id, token) jobs that were claimed but never started to queued, as if never claimed
    (the attempt is not counted). Used for a worker's prefetched jobs at shutdown. Returns how many."""
    now = time.time() if now is None else now

    def tx(c: apsw.Connection) -> int:
        released: Counter[tuple[str, str]] = Counter()
        for job_id, token in held:
            for (kind,) in c.execute(_GIVE_BACK + " AND lease_token = ? RETURNING kind", (now, job_id, token)):
                released[(kind, "released")] += 1
        totals.add(c, db.kinds, released)
        return released.total()

    return db.write(tx, "give back")


_GIVE_BACK = (
    "UPDATE jobs SET status = 'queued', attempts = max(attempts - 1, 0), updated_at = ?, lease_owner = NULL,"
    " lease_token = NULL, lease_until = NULL WHERE id = ? AND status = 'processing'"
)


def extend_owned(db: Database, owners: list[str], *, lease_s: float, now: float | None = None) -> int:
    """Renew, to now + lease_s, the lease of every job held by these owners (a supervisor, for its live workers).
    Returns how many leases were renewed."""
    now = time.time() if now is None else now
    if not owners:
        return 0

    def tx(c: apsw.Connection) -> int:
        marks = ",".join("?" * len(owners))
        c.execute(
            f"UPDATE jobs SET lease_until = ? WHERE status = 'processing' AND lease_owner IN ({marks})",
            (now + lease_s, *owners),
        )
        return c.changes()

    return db.write(tx, "extend leases")


@dataclass(frozen=True, slots=True)
class Released:
    failed: FailOutcome | None  # what became of the job that was running, if one was named
    given_back: int  # other held jobs, returned to queued without counting an attempt


def release_owner(db: Database, owner: str, *, running: int | None = None, error: str = "", killed: bool = False,
                  poison_kills: int = 3, backoff: Backoff, rng: random.Random | None = None,
                  now: float | None = None) -> Released:
    """Take back every job `owner` holds, in one transaction (a supervisor, when a worker died or was stopped).

    The `running` job, if named, fails its attempt with `error` (retry after backoff, or dead when out of
    attempts); when `killed` (its worker process died during it) its kill count goes up, and at poison_kills
    kills it is dead with "killed its worker N times". Every other held job goes back to queued as if it had
    never been claimed.
    """
    now = time.time() if now is None else now
    rng = rng or random.Random()

    def tx(c: apsw.Connection) -> Released:
        rows = c.execute(
            "SELECT id, attempts, max_attempts, user_id, kind, errors, kills FROM jobs"
            " WHERE status = 'processing' AND lease_owner = ?",
            (owner,),
        ).fetchall()
        failed, given_back = None, 0
        tally: Counter[tuple[str, str]] = Counter()
        for job_id, attempts, max_attempts, user_id, kind, errors, kills in rows:
            if job_id != running:
                c.execute(_GIVE_BACK, (now, job_id))
                given_back += 1
                tally[(kind, "released")] += 1
                continue
            kills += killed
            if killed:
                c.execute("UPDATE jobs SET kills = ? WHERE id = ?", (kills, job_id))
            poison = killed and kills >= poison_kills
            reason = f"killed its worker {kills} times; last: {error}" if poison else error
            failed = _fail_held(c, db, job_id, attempts, max_attempts, user_id, kind, errors, reason,
                                permanent=poison, delay=backoff.delay(attempts, rng), now=now, tally=tally)
        totals.add(c, db.kinds, tally)
        return Released(failed, given_back)

    return db.write(tx, "release jobs")


def recover_orphans(db: Database, *, owner_prefix: str, current_prefix: str, now: float | None = None) -> Recovered:
    """At supervisor start: every job still processing under an owner of a previous supervisor run (prefix
    `owner_prefix`, not `current_prefix`) lost its worker with that supervisor. Each counts as a failed attempt
    and goes back to queued at once (or dead when it was the last). Only one supervisor runs per database, so
    no live worker can hold these."""
    now = time.time() if now is None else now

    def tx(c: apsw.Connection) -> Recovered:
        rows = c.execute(
            "SELECT id, attempts, max_attempts, user_id, kind, errors FROM jobs WHERE status = 'processing'"
            " AND substr(lease_owner, 1, ?) = ? AND substr(lease_owner, 1, ?) != ?",
            (len(owner_prefix), owner_prefix, len(current_prefix), current_prefix),
        ).fetchall()
        dead = 0
        tally: Counter[tuple[str, str]] = Counter()
        for job in rows:
            out = _fail_held(c, db, *job, "its supervisor stopped while it ran", permanent=False, delay=0, now=now,
                             tally=tally)
            dead += out.status == "dead"
        totals.add(c, db.kinds, tally)
        return Recovered(len(rows) - dead, dead)

    return db.write(tx, "recover orphans")


def next_run_at(db: Database) -> float | None:
    """When the earliest job in backoff becomes runnable (epoch seconds), or None if none waits."""
    return db.read(lambda c: c.execute("SELECT min(run_at) FROM jobs WHERE status = 'scheduled'").fetchall()[0][0],
                   "next scheduled")
