"""Operator actions: cancel, retry, purge. Each runs in one IMMEDIATE transaction.

Operator actions bypass the submit limits on purpose: an operator retrying dead jobs is deciding to spend
capacity. Retried jobs get fresh fair-share virtual times, so a mass retry does not jump every other user.
Cancels, and jobs leaving a finished state (a retry of a dead or cancelled job, a purge), are counted in the
durable totals in the same transaction (store/totals.py: the jobs in each finished state are a difference of
totals).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import apsw

from cardq.errors import InvalidTransition, JobNotFound
from cardq.store import fairness, totals, usage
from cardq.store.db import Database

CANCELLABLE = ("queued", "scheduled", "processing")
RETRYABLE = ("dead", "cancelled", "scheduled")


def _status_of(c: apsw.Connection, job_id: int) -> str:
    rows = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchall()
    if not rows:
        raise JobNotFound(job_id)
    return rows[0][0]


def cancel(db: Database, job_id: int, *, now: float | None = None) -> str:
    """Cancel a queued, scheduled or processing job; returns the status it had. A processing job's holder
    loses its lease: its complete or fail will change nothing."""
    now = time.time() if now is None else now

    def tx(c: apsw.Connection) -> str:
        status = _status_of(c, job_id)
        if status not in CANCELLABLE:
            raise InvalidTransition(f"job {job_id} is {status}; only {', '.join(CANCELLABLE)} jobs can be cancelled")
        user_id, kind = c.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ?, lease_owner = NULL,"
            " lease_token = NULL, lease_until = NULL WHERE id = ? RETURNING user_id, kind",
            (now, now, job_id),
        ).fetchall()[0]
        usage.add_active(c, {user_id: -1})
        # (A held job's claim ends here: released, see store/totals.py.)
        totals.add(c, db.kinds, {(kind, "cancelled"): 1, (kind, "released"): int(status == "processing")})
        return status

    return db.write(tx, "cancel")


def retry(db: Database, job_id: int | None = None, *, status: str | None = None, user_id: str | None = None,
          kind: str | None = None, now: float | None = None) -> list[int]:
    """Queue again, to run now with a full set of attempts (and its poison kill count reset): one job by id, or
    every job matching the filter
    (status, default dead; user; kind). The error history is kept. Returns the ids queued again."""
    now = time.time() if now is None else now
    if status is not None and status not in RETRYABLE:
        raise InvalidTransition(f"cannot retry {status} jobs; expected one of: {', '.join(RETRYABLE)}")

    def tx(c: apsw.Connection) -> list[int]:
        if job_id is not None:
            current = _status_of(c, job_id)
            if current not in RETRYABLE:
                raise InvalidTransition(
                    f"job {job_id} is {current}; only {', '.join(RETRYABLE)} jobs can be retried")
            rows = c.execute("SELECT id, user_id, priority, status, kind FROM jobs WHERE id = ?",
                             (job_id,)).fetchall()
        else:
            sql = "SELECT id, user_id, priority, status, kind FROM jobs WHERE status = ?"
            args: list[object] = [status or "dead"]
            if user_id is not None:
                sql += " AND user_id = ?"
                args.append(user_id)
            if kind is not None:
                sql += " AND kind = ?"
                args.append(kind)
            rows = c.execute(sql + " ORDER BY id", args).fetchall()
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        reactivated: Counter[str] = Counter()
        left: Counter[tuple[str, str]] = Counter()
        for jid, user, priority, was, job_kind in rows:
            groups[(user, priority)].append(jid)
            reactivated[user] += was != "scheduled"  # scheduled jobs already count as active
            if was != "scheduled":
                left[(job_kind, totals.left(was))] += 1
        totals.add(c, db.kinds, left)
        day = db.days.key(now)
        for (user, priority), ids in groups.items():
            load = usage.load(c, user, day)
            assigned_max = c.execute("SELECT vt FROM sched WHERE id = 1").fetchall()[0][0]
            first_vt = fairness.start_vt(c, priority, active=load.active, last_vt=load.last_vt,
                                         assigned_max=assigned_max)
            last_vt = first_vt + len(ids) - 1
            c.execute("UPDATE sched SET vt = max(vt, ?) WHERE id = 1", (last_vt,))
            usage.add_jobs(c, user, reactivated.pop(user, 0), last_vt)
            c.executemany(
                "UPDATE jobs SET status = 'queued', attempts = 0, kills = 0, run_at = ?, vt = ?, finished_at = NULL,"
                " updated_at = ? WHERE id = ?",
                [(now, first_vt + n, now, jid) for n, jid in enumerate(ids)],
            )
        return [r[0] for r in rows]

    return db.write(tx, "retry")


def purge(db: Database, *, older_than_s: float, statuses: tuple[str, ...] = ("done",), dry_run: bool = False,
          now: float | None = None) -> int:
    """Delete finished jobs (done by default; also dead or cancelled if asked) that finished more than
    older_than_s ago, and daily figures older than that. Returns the number of jobs deleted (with dry_run: that
    would be deleted; nothing is)."""
    now = time.time() if now is None else now
    bad = [s for s in statuses if s not in ("done", "dead", "cancelled")]
    if bad:
        raise InvalidTransition(f"cannot purge {bad[0]} jobs; expected done, dead or cancelled")
    cutoff = now - older_than_s

    def tx(c: apsw.Connection) -> int:
        marks = ",".join("?" * len(statuses))
        if dry_run:
            return c.execute(f"SELECT count(*) FROM jobs WHERE status IN ({marks}) AND finished_at < ?",
                             (*statuses, cutoff)).fetchall()[0][0]
        left = Counter((kind, totals.left(status)) for kind, status in c.execute(
            f"DELETE FROM jobs WHERE status IN ({marks}) AND finished_at < ? RETURNING kind, status",
            (*statuses, cutoff)))
        deleted = left.total()
        totals.add(c, db.kinds, left)
        day = time.strftime("%Y-%m-%d", time.gmtime(cutoff - 86400))  # a day of slack for any time zone
        c.execute("DELETE FROM daily_stats WHERE day < ?", (day,))
        return deleted

    return db.write(tx, "purge")
