"""The store's durable totals (store/totals.py): bounded kinds, finished states as differences of totals through
purges and retries, the upgrade to the totals' schema seeded from the rows already there, and a snapshot that never
scans the jobs table."""

from __future__ import annotations

import time

import pytest

from cardq.errors import LimitExceeded
from cardq.store import Database, admin, jobs, totals
from cardq.store import submit as submit_mod
from cardq.store.schema import SCHEMA_VERSION, STATUSES

BACKOFF = jobs.Backoff(0.0, 0.0)


def submit(db: Database, n: int, kind: str, unlimited, user: str = "u1") -> list[int]:
    items = [submit_mod.NewJob(b"{}")] * n
    return submit_mod.submit(db, items, user_id=user, plan="free", kind=kind, configured=unlimited).ids


def run(db: Database, n: int, *, fail: bool = False, took: float | None = None) -> None:
    held = jobs.claim(db, "w", k=n, lease_s=30)
    if fail:
        for job in held:
            jobs.fail(db, job.id, job.token, "no", permanent=True, backoff=BACKOFF)
    else:
        jobs.complete_many(db, [(j.id, j.token, None) for j in held],
                           took={j.id: (j.kind, took) for j in held} if took is not None else None)


def counts(db: Database) -> dict[str, int]:
    by = dict.fromkeys(STATUSES, 0)
    by.update(db.conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
    return by


def test_kinds_past_max_kinds_are_counted_as_other(open_db, unlimited):
    db = open_db(max_kinds=2)
    for kind in ("a", "b", "c", "d"):
        submit(db, 1, kind, unlimited)
    run(db, 4)
    f = totals.snapshot(db)
    assert f.totals["submitted"] == {"a": 1, "b": 1, totals.OTHER: 2}
    assert f.totals["claimed"] == {"a": 1, "b": 1, totals.OTHER: 2}
    assert {k: sum(h.counts) for k, h in f.durations.items()} == {"a": 1, "b": 1, totals.OTHER: 2}
    # Another connection (another process) decides the same: the table says which kinds are counted.
    other = open_db(max_kinds=2)
    submit(other, 1, "e", unlimited)
    submit(other, 1, "a", unlimited)
    assert totals.snapshot(other).totals["submitted"] == {"a": 2, "b": 1, totals.OTHER: 3}


def test_finished_states_follow_purges_and_retries_without_counting_rows(db, unlimited):
    submit(db, 4, "a", unlimited)
    submit(db, 3, "b", unlimited)
    run(db, 3, took=0.02)
    run(db, 2, fail=True)
    admin.cancel(db, 6)
    assert totals.snapshot(db).jobs_by_state == counts(db) == {
        "queued": 1, "scheduled": 0, "processing": 0, "done": 3, "dead": 2, "cancelled": 1}
    assert admin.retry(db, status="dead") == [4, 5]
    assert admin.retry(db, 6) == [6]
    assert totals.snapshot(db).jobs_by_state == counts(db)
    run(db, 3, fail=True)
    assert admin.purge(db, older_than_s=0, statuses=("done", "dead"), now=time.time() + 1) == 6
    f = totals.snapshot(db)
    assert f.jobs_by_state == counts(db) == dict.fromkeys(STATUSES, 0) | {"queued": 1}
    # The totals themselves are what happened, whatever was purged since.
    assert f.totals["dead"] == {"a": 2, "b": 3} and f.totals["failed"] == {"a": 2, "b": 3}
    assert f.totals["cancelled"] == {"b": 1}
    assert f.durations["a"].counts[f.durations["a"].bounds.index(0.025)] == 3  # the handler's 0.02 s each
    assert f.oldest_queued_age_s is not None


def test_a_refused_submit_is_counted_and_nothing_else_is(db, configured):
    with pytest.raises(LimitExceeded):
        submit_mod.submit(db, [submit_mod.NewJob(b"{}")] * 6, user_id="u", plan="free", configured=configured)
    with pytest.raises(LimitExceeded):
        submit_mod.submit(db, [submit_mod.NewJob(b"{}")] * 201, user_id="u", plan="free", configured=configured)
    f = totals.snapshot(db)
    assert f.limit_rejections == {"daily.free": 1, "batch_max_items_per_request": 1}
    assert f.totals["submitted"] == {} and f.jobs_by_state["queued"] == 0


def test_the_upgrade_seeds_the_totals_from_the_rows(open_db, db_path, unlimited):
    db = open_db()
    submit(db, 5, "a", unlimited)
    submit(db, 2, "b", unlimited)
    run(db, 2)
    run(db, 2, fail=True)
    admin.cancel(db, 6)
    jobs.claim(db, "w", k=1, lease_s=30)  # one processing
    before = counts(db)
    # Back one version, as a database written by the previous release: no totals tables.
    for sql in ("DROP TABLE job_totals", "DROP TABLE limit_rejections",
                f"DELETE FROM schema_migrations WHERE version = {SCHEMA_VERSION}",
                f"PRAGMA user_version = {SCHEMA_VERSION - 1}"):
        db.conn.execute(sql).fetchall()
    db.close()
    upgraded = open_db()
    assert upgraded.schema_version() == SCHEMA_VERSION
    f = totals.snapshot(upgraded)
    assert f.jobs_by_state == before == {"queued": 1, "scheduled": 0, "processing": 1, "done": 2, "dead": 2,
                                         "cancelled": 1}
    assert f.totals["submitted"] == {"a": 5, "b": 2}
    assert f.totals["claimed"] == {"a": 5}  # done, failed and processing: the attempts made
    assert f.totals["failed"] == {"a": 2} and f.totals["dead"] == {"a": 2} and f.totals["cancelled"] == {"b": 1}
    assert sum(f.durations["a"].counts) == 2


def test_a_snapshot_scans_no_table_of_jobs(db, unlimited):
    submit(db, 3, "a", unlimited)
    run(db, 1)
    plans: list[str] = []

    def tracer(cursor, sql: str, bindings) -> bool:
        if sql.lstrip().upper().startswith("SELECT"):
            plans.extend(row[3] for row in db.conn.execute(f"EXPLAIN QUERY PLAN {sql}", bindings).fetchall())
        return True

    db.conn.exec_trace = tracer
    try:
        totals.snapshot(db)
    finally:
        db.conn.exec_trace = None
    on_jobs = [p for p in plans if " jobs" in p]
    assert on_jobs and all("INDEX" in p or "PRIMARY KEY" in p for p in on_jobs), plans
