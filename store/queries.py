"""Reads for operators: one job, a filtered list, and the status summary. Each runs in one read transaction,
so every number in a summary comes from the same snapshot; none blocks a writer (WAL)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import apsw
import orjson

from cardq.errors import InputError, JobNotFound
from cardq.store import limits as limits_mod
from cardq.store.db import Database
from cardq.store.schema import STATUSES
from cardq.vocabulary import FINISHED

JOB_COLUMNS = (
    "id", "user_id", "plan", "kind", "status", "priority", "attempts", "max_attempts", "run_at", "lease_owner",
    "lease_until", "last_error", "created_at", "updated_at", "started_at", "finished_at", "idempotency_key",
)
_JSON_COLUMNS = ("payload", "errors", "result")


def get(db: Database, job_id: int) -> dict[str, Any]:
    """Every field of one job, with payload, result and error history decoded."""
    cols = (*JOB_COLUMNS, *_JSON_COLUMNS)

    def tx(c: apsw.Connection) -> dict[str, Any]:
        rows = c.execute(f"SELECT {', '.join(cols)} FROM jobs WHERE id = ?", (job_id,)).fetchall()
        if not rows:
            raise JobNotFound(job_id)
        job = dict(zip(cols, rows[0], strict=True))
        for col in _JSON_COLUMNS:
            job[col] = orjson.loads(job[col]) if job[col] is not None else None
        return job

    return db.read(tx, "show job")


def statuses(db: Database, job_ids: list[int]) -> dict[int, str]:
    """The status of each job that exists, from one snapshot (a missing id is left out)."""
    def tx(c: apsw.Connection) -> dict[int, str]:
        return dict(c.execute("SELECT id, status FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
                              (orjson.dumps(job_ids).decode(),)).fetchall())

    return db.read(tx, "job statuses")


def list_jobs(db: Database, *, status: str | None = None, user_id: str | None = None, kind: str | None = None,
              limit: int = 50, newest_first: bool = True, after: int | None = None) -> list[dict[str, Any]]:
    """Jobs matching the filters (without payloads), newest first by default. `after` is the last id of the
    previous page: the next page starts past it (in the order asked for)."""
    where, args = [], []
    if kind is not None:
        where.append("kind = ?")
        args.append(kind)
    if after is not None:
        where.append("id < ?" if newest_first else "id > ?")
        args.append(after)
    if status is not None:
        if status not in STATUSES:
            raise InputError(f"unknown status {status!r}; expected one of: {', '.join(STATUSES)}")
        where.append("status = ?")
        args.append(status)
    if user_id is not None:
        where.append("user_id = ?")
        args.append(user_id)
    sql = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
    args.append(limit)
    return db.read(lambda c: [dict(zip(JOB_COLUMNS, r, strict=True)) for r in c.execute(sql, args)], "list jobs")


def stats(db: Database, configured: Mapping[str, tuple[int, str]], *, top_users: int = 10,
          now: float | None = None) -> dict[str, Any]:
    """The `cardq status` summary, from one snapshot."""
    now = time.time() if now is None else now
    day = db.days.key(now)

    def tx(c: apsw.Connection) -> dict[str, Any]:
        by_status = dict.fromkeys(STATUSES, 0)
        by_status.update(dict(c.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()))
        processing = dict(c.execute(
            "SELECT user_id, count(*) FROM jobs WHERE status = 'processing' GROUP BY user_id").fetchall())
        users = [
            {"user_id": u, "queued": active - processing.get(u, 0), "processing": processing.get(u, 0)}
            for u, active in c.execute(
                "SELECT user_id, active FROM user_load WHERE active > 0 ORDER BY active DESC, user_id LIMIT ?",
                (top_users,))
        ]
        oldest = c.execute(
            "SELECT min(created_at) FROM jobs WHERE status IN ('queued', 'scheduled')").fetchall()[0][0]
        expired = c.execute(
            "SELECT count(*) FROM jobs WHERE status = 'processing' AND lease_until < ?", (now,)).fetchall()[0][0]
        done_today = c.execute(
            "SELECT coalesce(sum(done_today), 0) FROM user_load WHERE done_day = ?", (day,)).fetchall()
        failed = c.execute("SELECT failed, dead FROM daily_stats WHERE day = ?", (day,)).fetchall()
        lims = limits_mod.effective(c, configured)
        return {
            "database": str(db.path),
            "jobs": by_status,
            "users": users,
            "oldest_queued_age_s": round(now - oldest, 3) if oldest is not None else None,
            "today": {
                "day": day,
                "timezone": db.tz.key,
                "done": done_today[0][0],
                "failed_attempts": failed[0][0] if failed else 0,
                "dead": failed[0][1] if failed else 0,
            },
            "expired_leases": expired,
            "limits": {k: {"value": v.value, "source": v.source} for k, v in lims.items()},
        }

    return db.read(tx, "status")


def finished_per_minute(db: Database, since: int, until: int) -> dict[str, list[int]]:
    """Jobs that finished in each minute from `since` to `until` (epoch seconds, whole minutes: multiples of 60),
    by final status: {"done": [n, ...], "dead": [...], "cancelled": [...]}, oldest minute first. Jobs purged
    since are not counted. One read of a range of the jobs_finished index (covering: no table row is read); it
    costs one index entry per job finished in the range, so callers keep the minutes already past (see
    cardq.api.Queue.throughput) rather than count an hour again every time."""
    if since % 60 or until % 60 or until < since:
        raise InputError(f"minutes {since}..{until}: expected whole minutes (multiples of 60), in order")
    minutes = (until - since) // 60
    counts = {status: [0] * minutes for status in FINISHED}
    rows = db.read(lambda c: c.execute(
        "SELECT CAST((finished_at - ?1) / 60 AS INTEGER), status, count(*) FROM jobs"
        " WHERE finished_at >= ?1 AND finished_at < ?2 GROUP BY 1, 2", (since, until)).fetchall(),
        "finished per minute")
    for minute, status, n in rows:
        if status in counts and 0 <= minute < minutes:
            counts[status][minute] = n
    return counts
