"""Submitting jobs: one, or a batch all-or-nothing, under the limits, in one IMMEDIATE transaction.

The limits are read and checked in the same transaction as the insert, so two concurrent submits can never
overshoot a limit together, and an override set a moment ago applies. The jobs submitted are counted in the
durable totals in that transaction too; a submit refused by a limit is counted after it (store/totals.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import apsw
import msgspec

from cardq.errors import InputError, LimitExceeded
from cardq.store import fairness, limits, totals, usage
from cardq.store.db import Database
from cardq.vocabulary import MAX_PRIORITY

MAX_NAME_LEN = 200
_CHUNK = 5000
_INSERT = (
    "INSERT INTO jobs (id, user_id, plan, kind, payload, status, priority, vt, max_attempts, run_at, created_at,"
    " updated_at, idempotency_key) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
)


class NewJob(msgspec.Struct, frozen=True):
    payload: bytes  # JSON text of an object (the CLI encodes it with orjson)
    idempotency_key: str | None = None
    where: str = ""  # where the item came from, for messages: "items.jsonl line 7"


class SubmitResult(msgspec.Struct, frozen=True):
    ids: list[int]  # one per item, in order; an existing job's id where its idempotency key was known
    created: int
    existing: int


def submit(db: Database, items: Sequence[NewJob], *, user_id: str, plan: str, kind: str = "card",
           priority: int = 0, max_attempts: int = 5, configured: Mapping[str, tuple[int, str]],
           now: float | None = None, progress: Callable[[int], object] | None = None) -> SubmitResult:
    """Insert a batch for one user, all or nothing.

    Refused whole (LimitExceeded, nothing inserted) when the batch is larger than batch_max_items_per_request,
    when the user's queued + processing jobs + the new ones would pass batch_max_queued_per_user, or when the
    user's jobs done today + queued/processing + the new ones would pass the plan's daily limit. An item whose
    idempotency key the user already used maps to the existing job and is not inserted again. `progress(n)` is
    called as rows are inserted (for a progress bar); the commit still happens once, at the end.
    """
    now = time.time() if now is None else now
    tx = _submit_tx(db, items, user_id=user_id, plan=plan, kind=kind, priority=priority, max_attempts=max_attempts,
                    configured=configured, now=now, progress=progress)
    try:
        return db.write(tx, "submit")
    except LimitExceeded as e:
        totals.count_rejection(db, e.limit)  # (its own transaction: the submit's was rolled back)
        raise


class SubmitRequest(msgspec.Struct, frozen=True):
    """One batch of `submit_many`: submit()'s arguments."""

    items: Sequence[NewJob]
    user_id: str
    plan: str
    kind: str = "card"
    priority: int = 0
    max_attempts: int = 5


def submit_many(db: Database, requests: Sequence[SubmitRequest], *, configured: Mapping[str, tuple[int, str]],
                now: float | None = None) -> list[SubmitResult | InputError | LimitExceeded]:
    """Several batches, each all or nothing as submit() makes it, in ONE transaction: one commit for all (a
    server taking submits from many clients at once). Applied in order, each under its own savepoint, so each
    sees the ones before it (limits included); one refused (LimitExceeded, InputError: returned in its place)
    leaves the others, a limit's refusal counted in the totals as submit() counts it. A failure of the transaction
    itself (StoreBusy, ...) is raised: then none was submitted.
    """
    now = time.time() if now is None else now
    out: list[SubmitResult | InputError | LimitExceeded | None] = [None] * len(requests)
    txs: list[tuple[int, Callable[[apsw.Connection], SubmitResult]]] = []
    for n, r in enumerate(requests):
        try:
            txs.append((n, _submit_tx(db, r.items, user_id=r.user_id, plan=r.plan, kind=r.kind, priority=r.priority,
                                      max_attempts=r.max_attempts, configured=configured, now=now)))
        except (InputError, LimitExceeded) as e:
            out[n] = e

    def tx(c: apsw.Connection) -> dict[int, SubmitResult | InputError | LimitExceeded]:
        done: dict[int, SubmitResult | InputError | LimitExceeded] = {}  # (made anew if the write is retried)
        for n, one in txs:
            c.execute("SAVEPOINT submit_one")
            try:
                done[n] = one(c)
            except (InputError, LimitExceeded) as e:
                c.execute("ROLLBACK TO submit_one")
                done[n] = e
                if isinstance(e, LimitExceeded):
                    totals.add_rejection(c, e.limit)  # (after its savepoint's rollback, as submit() counts it)
            c.execute("RELEASE submit_one")
        return done

    if txs:
        for n, result in db.write(tx, "submit").items():
            out[n] = result
    return out  # type: ignore[return-value]  (every place filled)


def _submit_tx(db: Database, items: Sequence[NewJob], *, user_id: str, plan: str, kind: str, priority: int,
               max_attempts: int, configured: Mapping[str, tuple[int, str]], now: float,
               progress: Callable[[int], object] | None = None) -> Callable[[apsw.Connection], SubmitResult]:
    """The checks that need no database (InputError now), then the transaction's body (see submit)."""
    _check_names(user_id=user_id, kind=kind)
    if not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise InputError(f"priority {priority!r}: expected a whole number from 0 to {MAX_PRIORITY} (higher runs first)")
    if f"{limits.DAILY_PREFIX}{plan}" not in configured:
        plans = ", ".join(k[len(limits.DAILY_PREFIX):] for k in configured if k.startswith(limits.DAILY_PREFIX))
        raise InputError(f"unknown plan {plan!r}; expected one of: {plans}")
    if not items:
        raise InputError("empty batch: expected at least one item")
    day = db.days.key(now)

    def tx(c: apsw.Connection) -> SubmitResult:
        lim = limits.values(c, configured)
        _check_batch(items, lim)
        ids, fresh = _dedupe(c, items, user_id)
        if fresh:
            load = usage.load(c, user_id, day)
            _check_user(load, user_id, plan, len(fresh), lim, db, now)
            first_id, assigned_max = c.execute("SELECT next_job_id, vt FROM sched WHERE id = 1").fetchall()[0]
            first_vt = fairness.start_vt(c, priority, active=load.active, last_vt=load.last_vt,
                                         assigned_max=assigned_max)
            new_ids = range(first_id, first_id + len(fresh))
            for i, job_id in zip(fresh, new_ids, strict=True):
                ids[i] = job_id
            rows = [(job_id, user_id, plan, kind, items[i].payload.decode(), priority, job_id - first_id + first_vt,
                     max_attempts, now, now, now, items[i].idempotency_key) for i, job_id in zip(fresh, new_ids,
                                                                                                 strict=True)]
            for start in range(0, len(rows), _CHUNK):
                c.executemany(_INSERT, rows[start:start + _CHUNK])
                if progress is not None:
                    progress(len(rows[start:start + _CHUNK]))
            last_vt = first_vt + len(fresh) - 1
            c.execute("UPDATE sched SET next_job_id = ?, vt = max(vt, ?) WHERE id = 1",
                      (first_id + len(fresh), last_vt))
            usage.add_jobs(c, user_id, len(fresh), last_vt)
            totals.add(c, db.kinds, {(kind, "submitted"): len(fresh)})
            for i, v in enumerate(ids):
                if v < 0:  # a repeated key within this batch: the id its first occurrence got
                    ids[i] = ids[-1 - v]
        return SubmitResult(ids, len(fresh), len(items) - len(fresh))

    return tx


def _check_names(**names: str) -> None:
    """A user id or kind: 1 to 200 printable characters, no whitespace (no newline or escape sequence can ride in
    one and forge a line of `cardq status` or `jobs list`)."""
    for field, value in names.items():
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LEN or not value.isprintable() \
                or any(ch.isspace() for ch in value):
            reason = (f"expected 1 to {MAX_NAME_LEN} printable characters with no spaces or control characters "
                      "(such as u42, user@example.com, 7f3a-…)")
            raise InputError(f"{field} {value!r}: {reason}", where=field, reason=reason)


def _check_batch(items: Sequence[NewJob], lim: Mapping[str, int]) -> None:
    cap = lim["batch_max_items_per_request"]
    if len(items) > cap:
        raise LimitExceeded(
            f"batch rejected: {len(items)} items, batch_max_items_per_request is {cap}; nothing was submitted",
            limit="batch_max_items_per_request", allowed=cap, current=0, requested=len(items))
    max_bytes = lim["max_payload_bytes"]
    if max(map(len, (item.payload for item in items))) <= max_bytes:
        return
    for n, item in enumerate(items, 1):
        if len(item.payload) > max_bytes:
            where = item.where or f"item {n}"
            reason = f"payload is {len(item.payload)} bytes, max_payload_bytes is {max_bytes}"
            raise InputError(f"{where}: {reason}; nothing was submitted", where=where, index=n - 1, reason=reason)


def _dedupe(c: apsw.Connection, items: Sequence[NewJob], user_id: str) -> tuple[list[int], list[int]]:
    """ids (0 = to insert) and the indexes of items to insert. A key repeated within the batch is inserted once."""
    ids = [0] * len(items)
    keyed = {it.idempotency_key for it in items if it.idempotency_key is not None}
    if not keyed:
        return ids, list(range(len(items)))
    known: dict[str, int] = {}
    for key in keyed:
        rows = c.execute(
            "SELECT id FROM jobs WHERE user_id = ? AND idempotency_key = ?", (user_id, key)
        ).fetchall()
        if rows:
            known[key] = rows[0][0]
    fresh: list[int] = []
    first_of: dict[str, int] = {}
    for i, item in enumerate(items):
        key = item.idempotency_key
        if key is not None and key in known:
            ids[i] = known[key]
        elif key is not None and key in first_of:
            ids[i] = -1 - first_of[key]  # filled in below, once the first one has its id
        else:
            if key is not None:
                first_of[key] = i
            fresh.append(i)
    return ids, fresh


def _check_user(load: usage.UserLoad, user_id: str, plan: str, adding: int, lim: Mapping[str, int],
                db: Database, now: float) -> None:
    active = load.active
    cap = lim["batch_max_queued_per_user"]
    if active + adding > cap:
        raise LimitExceeded(
            f"too many requests: user {user_id} has {active} jobs queued or processing, this batch adds {adding}, "
            f"batch_max_queued_per_user is {cap}; nothing was submitted, retry when some are done",
            limit="batch_max_queued_per_user", allowed=cap, current=active, requested=adding)
    daily = lim[f"{limits.DAILY_PREFIX}{plan}"]
    done = load.done_today
    if done + active + adding > daily:
        raise LimitExceeded(
            f"daily limit: user {user_id} has {done} jobs done today and {active} queued or processing, this "
            f"batch adds {adding}, plan {plan} allows {daily} a day; nothing was submitted (resets at midnight "
            f"{db.tz.key})",
            limit=f"{limits.DAILY_PREFIX}{plan}", allowed=daily, current=done + active, requested=adding,
            resets_at=usage.next_day_start(now, db.tz))
