"""Benchmark cardq's store against raw apsw floors measured in the same run, on the same machine.

    .venv/bin/python benchmarks/bench_store.py            # the full spec (about 1-2 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_store.py --quick    # smaller sizes, for a quick look

Every figure is cardq's number next to a raw apsw loop (the floor) and their ratio: absolute numbers drift a lot
on a shared VM, ratios measured in one run much less. Each measurement runs in a fresh database in its own temp
folder (removed afterwards), in WAL mode with synchronous=NORMAL for cardq and for the raw loops alike (raw
connections set each pragma in its own call and read it back: see FIELD_NOTES, "apsw runs a multi-statement
string lazily"). Each measurement is repeated (3 times by default) and the best run is reported. Targets are
printed as PASS/FAIL, but the exit status is always 0: this is a report, not a test.

The "same SQL" floors run exactly the statements cardq runs, in the same transactions, on a connection with the
same settings as cardq's (statement cache, QPSG, foreign_keys, journal_size_limit), with as little Python around
them as possible: the ratio is cardq's Python overhead. The statements the store keeps as module constants are
imported from it; the few it writes inline are copied here, and at start-up check_same_sql() traces cardq's calls
and the raw loops side by side and warns on any drift (statements, transactions, settings, resulting rows).
The floors that are not cardq's SQL (1-row insert, executemany, the FIELD_NOTES minimal table) use a plain
WAL + synchronous=NORMAL connection.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
import zoneinfo
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import apsw

from cardq.config import load_config
from cardq.store import jobs, usage
from cardq.store import submit as submit_mod
from cardq.store.db import Database
from cardq.store.fairness import _HEAD
from cardq.store.jobs import _CLAIM_MANY, _CLAIM_ONE, _COMPLETE
from cardq.store.submit import _INSERT, NewJob
from cardq.store.totals import _ADD, _DONE_EVENTS, DURATION_BOUNDS

# ---------------------------------------------------------------------------------------------------------------
# The SQL cardq runs. Statements the store keeps as module constants are imported above (_INSERT, _HEAD,
# _CLAIM_ONE, _CLAIM_MANY, _COMPLETE, the totals' _ADD); the ones it writes inline are copied here.
# check_same_sql() traces cardq's own calls next to the raw loops' and warns if they drift apart.

PROMOTE = (  # jobs.claim (?2: the clock-step horizon, +inf when none is given)
    "UPDATE jobs SET status = 'queued', updated_at = ?1 WHERE status = 'scheduled' AND (run_at <= ?1 OR run_at > ?2)"
)
RECORD_DONE = (  # usage.record_done
    "UPDATE user_load SET active = active - ?1,"
    " done_today = CASE WHEN done_day = ?2 THEN done_today + ?1 ELSE ?1 END, done_day = ?2"
    " WHERE user_id = ?3"
)
LIMITS = "SELECT key, value FROM limits"  # limits.effective
LOAD = (  # usage.load
    "SELECT active, last_vt, CASE WHEN done_day = ? THEN done_today ELSE 0 END FROM user_load"
    " WHERE user_id = ?"
)
SCHED = "SELECT next_job_id, vt FROM sched WHERE id = 1"  # submit.submit
SET_SCHED = "UPDATE sched SET next_job_id = ?, vt = max(vt, ?) WHERE id = 1"  # submit.submit
ADD_JOBS = (  # usage.add_jobs
    "INSERT INTO user_load (user_id, active, last_vt) VALUES (?1, ?2, ?3)"
    " ON CONFLICT (user_id) DO UPDATE SET active = active + ?2, last_vt = ?3"
)

# The FIELD_NOTES-style minimal floor: a 5-column jobs table with a partial index on queued jobs.
MINI_SCHEMA = (
    "CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT NOT NULL, payload TEXT NOT NULL, owner TEXT,"
    " result TEXT)",
    "CREATE INDEX jobs_queued ON jobs (id) WHERE status = 'queued'",
)
MINI_CLAIM_ONE = (
    "UPDATE jobs SET status = 'processing', owner = ? WHERE id = (SELECT id FROM jobs WHERE status = 'queued'"
    " ORDER BY id LIMIT 1) RETURNING id, payload"
)
MINI_CLAIM_MANY = (
    "UPDATE jobs SET status = 'processing', owner = ? WHERE id IN (SELECT id FROM jobs WHERE status = 'queued'"
    " ORDER BY id LIMIT ?) RETURNING id, payload"
)
MINI_DONE = "UPDATE jobs SET status = 'done', result = ? WHERE id = ?"

PAYLOAD = b'{"title":"Card","name":"Ada Lovelace","n":12345}'
PAYLOAD_TEXT = PAYLOAD.decode()
PLAN = "free"
LEASE_S = 30.0
BATCH_K = 32
SUBMIT_CHUNK = 100_000  # the biggest batch handed to store.submit.submit when filling a queue


def huge_limits() -> dict[str, tuple[int, str]]:
    """cardq's configured limits with every value raised to 10**9, so no submit is refused."""
    return {key: (10**9, source) for key, (_, source) in load_config(None).limit_values().items()}


CONFIGURED = huge_limits()


# ---------------------------------------------------------------------------------------------------------------
# Databases


@contextlib.contextmanager
def fresh_dir(parent: str | None) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cardq-bench-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def open_cardq(path: Path, *, worker: bool = False) -> Database:
    """worker: open as a worker does (wal_autocheckpoint=0: the supervisor checkpoints, off the hot path)."""
    db = Database.open(path, create=True, synchronous="normal", autocheckpoint=not worker)
    got = db.pragmas()
    if got["journal_mode"] != "wal" or got["synchronous"] != 1:
        raise SystemExit(f"cardq connection has the wrong pragmas: {got}")
    return db


def open_raw(path: Path, *, like_cardq: bool = False, worker: bool = False) -> apsw.Connection:
    """A plain apsw connection: WAL + synchronous=NORMAL, one pragma per call, each read back.

    like_cardq: also every other setting store/db.py's Database.open gives a connection (statement cache size,
    QPSG, foreign_keys, journal_size_limit), for the loops that run cardq's own SQL; check_same_sql() compares
    the two connections' settings. The floors (1-row insert, executemany, FIELD_NOTES minimal) stay plain.
    """
    conn = apsw.Connection(str(path), statementcachesize=256) if like_cardq else apsw.Connection(str(path))
    conn.setbusytimeout(5000)
    if like_cardq:
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 1)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    conn.execute("PRAGMA synchronous=NORMAL").fetchall()
    sync = conn.execute("PRAGMA synchronous").fetchall()[0][0]
    if mode.lower() != "wal" or sync != 1:
        raise SystemExit(f"raw connection has the wrong pragmas: journal_mode={mode} synchronous={sync}")
    if like_cardq:
        conn.execute("PRAGMA foreign_keys=ON").fetchall()
        conn.execute("PRAGMA journal_size_limit=67108864").fetchall()
        got = (conn.execute("PRAGMA foreign_keys").fetchall()[0][0],
               conn.execute("PRAGMA journal_size_limit").fetchall()[0][0],
               conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, -1))
        if got != (1, 67108864, 1):
            raise SystemExit(f"raw connection has the wrong settings: foreign_keys, journal_size_limit, QPSG = {got}")
    if worker:  # like a worker's connection: no automatic checkpoint inside a commit
        conn.execute("PRAGMA wal_autocheckpoint=0").fetchall()
    return conn


_PRAGMAS = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout", "journal_size_limit", "wal_autocheckpoint",
            "cache_size", "mmap_size", "temp_store", "locking_mode", "cache_spill", "automatic_index")
_NOT_A_FLAG = {"SQLITE_DBCONFIG_LOOKASIDE", "SQLITE_DBCONFIG_MAINDBNAME", "SQLITE_DBCONFIG_RESET_DATABASE"}


def settings(conn: apsw.Connection) -> dict[str, object]:
    """What a connection is set to: pragmas, every sqlite3_db_config flag apsw knows, the statement cache size."""
    out: dict[str, object] = {f"PRAGMA {name}": conn.execute(f"PRAGMA {name}").fetchall()[0][0] for name in _PRAGMAS}
    for name in sorted(n for n in dir(apsw) if n.startswith("SQLITE_DBCONFIG_") and n not in _NOT_A_FLAG):
        with contextlib.suppress(apsw.Error, ValueError):  # one this SQLite does not support
            out[name] = conn.config(getattr(apsw, name), -1)  # -1: read, do not change
    out["statement cache size"] = conn.cache_stats()["size"]
    return out


def cardq_schema(path: Path) -> None:
    """Create cardq's schema (and nothing else) at path, for a raw loop."""
    open_cardq(path).close()


def mini_schema(conn: apsw.Connection) -> None:
    for sql in MINI_SCHEMA:
        conn.execute(sql)


def fill(db: Database, total: int, users: int, prefix: str = "user") -> None:
    """Queue `total` jobs through the real store.submit.submit, spread over `users` users, in chunks."""
    items = [NewJob(PAYLOAD)] * min(SUBMIT_CHUNK, max(1, total))
    per_user = [total // users + (1 if u < total % users else 0) for u in range(users)]
    for u, n in enumerate(per_user):
        while n > 0:
            chunk = min(n, SUBMIT_CHUNK)
            submit_mod.submit(db, items[:chunk], user_id=f"{prefix}{u}", plan=PLAN, configured=CONFIGURED)
            n -= chunk


def mini_fill(conn: apsw.Connection, total: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO jobs (status, payload) VALUES ('queued', ?)", ((PAYLOAD_TEXT,) for _ in range(total)))
    conn.execute("COMMIT")


def today() -> str:
    """The day key cardq's complete() uses (Database.open's default timezone is UTC)."""
    return usage.day_key(time.time(), zoneinfo.ZoneInfo("UTC"))


def timed(fn: Callable[[], object]) -> float:
    """Seconds fn() takes, after a full garbage collection (GC stays enabled while it runs, as in real use)."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# 0. The raw loops run cardq's SQL: check it by tracing cardq's own calls and the raw loops side by side.


@dataclass
class SameSql:
    problems: list[str]
    statements: dict[str, int]  # statements cardq ran (BEGIN and COMMIT included), per operation checked


def check_same_sql(parent: str | None) -> SameSql:
    """Run cardq's submit / claim / complete and the raw loops that stand for them on two identically filled
    databases, tracing every statement; report any difference in the statements (in order, BEGIN and COMMIT
    included, so the transactions too), in the connections' settings, or in the rows they leave behind."""
    problems: list[str] = []
    statements: dict[str, int] = {}

    def norm(sql: str) -> str:
        return " ".join(sql.split())

    def traced(conn: apsw.Connection, fn: Callable[[], object]) -> list[str]:
        seen: list[str] = []

        def tracer(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
            s = norm(sql)
            if not seen or seen[-1] != s:  # an executemany shows once
                seen.append(s)
            return True

        conn.exec_trace = tracer
        try:
            fn()
        finally:
            conn.exec_trace = None
        return seen

    def state(conn: apsw.Connection) -> list[tuple]:
        """Every row the benchmarked calls write, less what differs by design (times, lease tokens)."""
        return [
            *conn.execute(
                "SELECT id, user_id, plan, kind, payload, status, priority, vt, attempts, max_attempts, lease_owner,"
                " lease_token IS NULL, lease_until IS NULL, started_at IS NULL, finished_at IS NULL, result,"
                " last_error, errors, idempotency_key, kills FROM jobs ORDER BY id").fetchall(),
            *conn.execute("SELECT * FROM user_load ORDER BY user_id").fetchall(),
            *conn.execute("SELECT * FROM sched").fetchall(),
            *conn.execute("SELECT * FROM daily_stats ORDER BY day").fetchall(),
            *conn.execute("SELECT kind, event, n FROM job_totals WHERE event NOT LIKE 'done:%' ORDER BY kind, event"
                          ).fetchall(),
            *conn.execute("SELECT kind, sum(n) FROM job_totals WHERE event LIKE 'done:%' GROUP BY kind").fetchall(),
        ]

    with fresh_dir(parent) as d:
        db = open_cardq(d / "cardq.db")
        fill(db, 200, 2)
        other = open_cardq(d / "raw.db")
        fill(other, 200, 2)
        other.close()
        raw = open_raw(d / "raw.db", like_cardq=True)

        mine, theirs = settings(db.conn), settings(raw)
        differ = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
        if differ:
            problems.append("connection settings differ (cardq, raw): "
                            + ", ".join(f"{k} {v}" for k, v in sorted(differ.items())))

        def compare(what: str, cardq_fn: Callable[[], object], raw_fn: Callable[[], object]) -> None:
            got, want = traced(db.conn, cardq_fn), traced(raw, raw_fn)
            statements[what] = len(got)
            if got != want:
                extra = [s for s in got if s not in want]
                missing = [s for s in want if s not in got]
                problems.append(f"{what}: cardq ran {len(got)} statements, the raw loop {len(want)}"
                                + ("" if extra or missing else " (the same ones, in another order)")
                                + f"; only in cardq: {extra}; only in the raw loop: {missing}")

        compare("single submit",
                lambda: submit_mod.submit(db, [NewJob(PAYLOAD)], user_id="user0", plan=PLAN, configured=CONFIGURED),
                lambda: raw_submit_one(raw, ["user0"], 1))
        compare("claim k=1 + complete", lambda: cardq_claim_complete_one(db, 1),
                lambda: raw_claim_complete_one(raw, 1, 1))
        compare(f"claim k={BATCH_K} + complete_many", lambda: cardq_claim_many(db, 1),
                lambda: raw_claim_many(raw, 1, 2, one_tx=False))

        a, b = state(db.conn), state(raw)
        if a != b:
            first = next((x, y) for x, y in zip([*a, None], [*b, None], strict=False) if x != y)
            problems.append(f"after the same calls, cardq's rows and the raw loops' differ; first difference: "
                            f"cardq {first[0]}, raw {first[1]}")
        raw.close()
        db.close()
    return SameSql(problems, statements)


# ---------------------------------------------------------------------------------------------------------------
# 1. Batch submit


def bench_batch_cardq(parent: str | None, n: int) -> float:
    with fresh_dir(parent) as d:
        db = open_cardq(d / "b.db")
        submit_mod.submit(db, [NewJob(PAYLOAD)] * 1000, user_id="warmup", plan=PLAN, configured=CONFIGURED)
        items = [NewJob(PAYLOAD) for _ in range(n)]
        secs = timed(lambda: submit_mod.submit(db, items, user_id="user0", plan=PLAN, configured=CONFIGURED))
        db.close()
    return n / secs


def bench_batch_raw_jobs(parent: str | None, n: int) -> float:
    """executemany of the same columns into cardq's own jobs table, one transaction."""
    with fresh_dir(parent) as d:
        cardq_schema(d / "b.db")
        conn = open_raw(d / "b.db")
        now = time.time()

        def rows(first: int, count: int, user: str) -> list[tuple]:
            return [(first + i, user, PLAN, "card", PAYLOAD_TEXT, 0, first + i, 5, now, now, now, None)
                    for i in range(count)]

        warm = rows(1, 1000, "warmup")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, warm)
        conn.execute("COMMIT")
        batch = rows(1001, n, "user0")

        def run() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, batch)
            conn.execute("COMMIT")

        secs = timed(run)
        conn.close()
    return n / secs


def bench_batch_raw_mini(parent: str | None, n: int) -> float:
    """executemany into a minimal (id, payload) table, one transaction: the disk-and-SQLite floor."""
    with fresh_dir(parent) as d:
        conn = open_raw(d / "b.db")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t (id, payload) VALUES (?, ?)", [(i, PAYLOAD_TEXT) for i in range(1, 1001)])
        conn.execute("COMMIT")
        batch = [(1001 + i, PAYLOAD_TEXT) for i in range(n)]

        def run() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO t (id, payload) VALUES (?, ?)", batch)
            conn.execute("COMMIT")

        secs = timed(run)
        conn.close()
    return n / secs


# ---------------------------------------------------------------------------------------------------------------
# 2. Single submits, one transaction each


def bench_single_cardq(parent: str | None, n: int, users: int, warm: int) -> float:
    names = [f"user{u}" for u in range(users)]
    one = [NewJob(PAYLOAD)]
    with fresh_dir(parent) as d:
        db = open_cardq(d / "s.db")

        def run(count: int) -> None:
            for i in range(count):
                submit_mod.submit(db, one, user_id=names[i % users], plan=PLAN, configured=CONFIGURED)

        run(warm)
        secs = timed(lambda: run(n))
        db.close()
    return n / secs


def bench_single_raw(parent: str | None, n: int, users: int, warm: int) -> float:
    """BEGIN IMMEDIATE; INSERT the same row into cardq's jobs table; COMMIT."""
    names = [f"user{u}" for u in range(users)]
    with fresh_dir(parent) as d:
        cardq_schema(d / "s.db")
        conn = open_raw(d / "s.db")
        ex = conn.execute
        next_id = [1]

        def run(count: int) -> None:
            job_id = next_id[0]
            for i in range(count):
                now = time.time()
                ex("BEGIN IMMEDIATE")
                ex(_INSERT, (job_id + i, names[i % users], PLAN, "card", PAYLOAD_TEXT, 0, job_id + i, 5, now, now,
                             now, None))
                ex("COMMIT")
            next_id[0] += count

        run(warm)
        secs = timed(lambda: run(n))
        conn.close()
    return n / secs


def raw_submit_one(conn: apsw.Connection, names: list[str], count: int) -> None:
    """cardq's SQL for `count` submit() calls of one job each, by names[i % len(names)], one transaction each:
    limits, the user's load, sched (next id and vt), the queue head (fair share), the insert (executemany, as
    cardq), sched and the user's counters written back once each."""
    ex = conn.execute
    users = len(names)
    day = today()
    for i in range(count):
        user = names[i % users]
        now = time.time()
        ex("BEGIN IMMEDIATE")
        ex(LIMITS).fetchall()
        load = ex(LOAD, (day, user)).fetchall()
        active, last_vt = (load[0][0], load[0][1]) if load else (0, 0)
        job_id, assigned_max = ex(SCHED).fetchall()[0]
        head = ex(_HEAD, (0,)).fetchall()
        floor = head[0][0] if head else assigned_max
        vt = max(last_vt + 1, floor) if active else floor
        conn.executemany(_INSERT, [(job_id, user, PLAN, "card", PAYLOAD_TEXT, 0, vt, 5, now, now, now, None)])
        ex(SET_SCHED, (job_id + 1, vt))
        ex(ADD_JOBS, (user, 1, vt))
        conn.executemany(_ADD, [("card", "submitted", 1, 0.0)])
        ex("COMMIT")


def bench_single_raw_same_sql(parent: str | None, n: int, users: int, warm: int) -> float:
    """The statements cardq's submit runs for one job (raw_submit_one), with the least Python around them."""
    names = [f"user{u}" for u in range(users)]
    with fresh_dir(parent) as d:
        cardq_schema(d / "s.db")
        conn = open_raw(d / "s.db", like_cardq=True)
        raw_submit_one(conn, names, warm)
        secs = timed(lambda: raw_submit_one(conn, names, n))
        conn.close()
    return n / secs


# ---------------------------------------------------------------------------------------------------------------
# 3 and 5. Claim one + complete, two transactions per job


HANDLER_S = 0.0001  # the handler time a worker reports with each result (its kind and this): a no-op's


def cardq_claim_complete_one(db: Database, count: int) -> None:
    for _ in range(count):
        held = jobs.claim(db, "worker-1", k=1, lease_s=LEASE_S)
        jobs.complete_many(db, [(held[0].id, held[0].token, None)], took={held[0].id: (held[0].kind, HANDLER_S)})


def raw_claim_complete_one(conn: apsw.Connection, count: int, first_token: int) -> None:
    """cardq's SQL for claim(k=1) then complete (as a worker: with the job's kind and handler time): PROMOTE +
    _CLAIM_ONE, then _COMPLETE + RECORD_DONE + the job's duration bucket in the totals."""
    ex = conn.execute
    day = today()
    for token in range(first_token, first_token + count):
        now = time.time()
        ex("BEGIN IMMEDIATE")
        ex(PROMOTE, (now, float("inf")))
        job_id = ex(_CLAIM_ONE, ("worker-1", token, now + LEASE_S, now, now, 1)).fetchall()[0][0]
        ex("COMMIT")
        ex("BEGIN IMMEDIATE")
        user = ex(_COMPLETE, (f"[[{job_id},{token},null]]", now)).fetchall()[0][1]
        conn.executemany(RECORD_DONE, [(1, day, user)])
        conn.executemany(_ADD, [("card", _DONE_EVENTS[bisect.bisect_left(DURATION_BOUNDS, HANDLER_S)], 1, HANDLER_S)])
        ex("COMMIT")


def mini_claim_complete_one(conn: apsw.Connection, count: int) -> None:
    ex = conn.execute
    for _ in range(count):
        ex("BEGIN IMMEDIATE")
        job_id = ex(MINI_CLAIM_ONE, ("worker-1",)).fetchall()[0][0]
        ex("COMMIT")
        ex("BEGIN IMMEDIATE")
        ex(MINI_DONE, ("null", job_id))
        ex("COMMIT")


def bench_one_cardq(parent: str | None, n: int, users: int, warm: int) -> float:
    with fresh_dir(parent) as d:
        db = open_cardq(d / "c.db", worker=True)
        fill(db, n + warm + 100, users)
        cardq_claim_complete_one(db, warm)
        secs = timed(lambda: cardq_claim_complete_one(db, n))
        db.close()
    return n / secs


def bench_one_raw(parent: str | None, n: int, users: int, warm: int) -> float:
    with fresh_dir(parent) as d:
        db = open_cardq(d / "c.db")
        fill(db, n + warm + 100, users)
        db.close()
        conn = open_raw(d / "c.db", like_cardq=True, worker=True)
        raw_claim_complete_one(conn, warm, 1)
        secs = timed(lambda: raw_claim_complete_one(conn, n, warm + 1))
        conn.close()
    return n / secs


def bench_one_mini(parent: str | None, n: int, warm: int) -> float:
    with fresh_dir(parent) as d:
        conn = open_raw(d / "m.db")
        mini_schema(conn)
        mini_fill(conn, n + warm + 100)
        mini_claim_complete_one(conn, warm)
        secs = timed(lambda: mini_claim_complete_one(conn, n))
        conn.close()
    return n / secs


# ---------------------------------------------------------------------------------------------------------------
# 4. Claim 32 at a time + complete_many


def cardq_claim_many(db: Database, batches: int) -> None:
    for _ in range(batches):
        held = jobs.claim(db, "worker-1", k=BATCH_K, lease_s=LEASE_S)
        jobs.complete_many(db, [(j.id, j.token, None) for j in held], took={j.id: (j.kind, HANDLER_S) for j in held})


def cardq_worker_loop(db: Database, batches: int) -> None:
    """What a worker with prefetch 32 does: each batch's results committed with the next claim (1 tx/batch)."""
    done: list[tuple[int, int, None]] = []
    took: dict[int, tuple[str, float]] = {}
    for _ in range(batches):
        _lost, held = jobs.finish_and_claim(db, done, "worker-1", k=BATCH_K, lease_s=LEASE_S, took=took)
        done = [(j.id, j.token, None) for j in held]
        took = {j.id: (j.kind, HANDLER_S) for j in held}
    jobs.complete_many(db, done, took=took)


def raw_claim_many(conn: apsw.Connection, batches: int, first_token: int, *, one_tx: bool) -> None:
    """cardq's SQL for claim(k=32) then complete_many(): two transactions per batch, or (one_tx) one."""
    ex = conn.execute
    day = today()
    for token in range(first_token, first_token + batches):
        now = time.time()
        ex("BEGIN IMMEDIATE")
        ex(PROMOTE, (now, float("inf")))
        rows = ex(_CLAIM_MANY, ("worker-1", token, now + LEASE_S, now, now, BATCH_K)).fetchall()
        if not one_tx:
            ex("COMMIT")
            ex("BEGIN IMMEDIATE")
        batch = "[" + ",".join([f"[{row[0]},{token},null]" for row in rows]) + "]"
        by_user: dict[str, int] = {}
        n_done = 0
        for _, user in ex(_COMPLETE, (batch, now)).fetchall():
            by_user[user] = by_user.get(user, 0) + 1
            n_done += 1
        conn.executemany(RECORD_DONE, [(k, day, user) for user, k in by_user.items()])
        bucket = _DONE_EVENTS[bisect.bisect_left(DURATION_BOUNDS, HANDLER_S)]
        conn.executemany(_ADD, [("card", bucket, n_done, n_done * HANDLER_S)])
        ex("COMMIT")


def mini_claim_many(conn: apsw.Connection, batches: int) -> None:
    ex = conn.execute
    for _ in range(batches):
        ex("BEGIN IMMEDIATE")
        rows = ex(MINI_CLAIM_MANY, ("worker-1", BATCH_K)).fetchall()
        conn.executemany(MINI_DONE, [("null", row[0]) for row in rows])
        ex("COMMIT")


def bench_many_cardq(parent: str | None, batches: int, users: int, warm: int,
                     loop: Callable[[Database, int], None] = cardq_claim_many) -> float:
    with fresh_dir(parent) as d:
        db = open_cardq(d / "m.db", worker=True)
        fill(db, (batches + warm + 4) * BATCH_K, users)
        loop(db, warm)
        secs = timed(lambda: loop(db, batches))
        db.close()
    return batches * BATCH_K / secs


def bench_many_raw(parent: str | None, batches: int, users: int, warm: int, *, one_tx: bool) -> float:
    with fresh_dir(parent) as d:
        db = open_cardq(d / "m.db")
        fill(db, (batches + warm + 4) * BATCH_K, users)
        db.close()
        conn = open_raw(d / "m.db", like_cardq=True, worker=True)
        raw_claim_many(conn, warm, 1, one_tx=one_tx)
        secs = timed(lambda: raw_claim_many(conn, batches, warm + 1, one_tx=one_tx))
        conn.close()
    return batches * BATCH_K / secs


def bench_many_mini(parent: str | None, batches: int, warm: int) -> float:
    with fresh_dir(parent) as d:
        conn = open_raw(d / "m.db")
        mini_schema(conn)
        mini_fill(conn, (batches + warm + 4) * BATCH_K)
        mini_claim_many(conn, warm)
        secs = timed(lambda: mini_claim_many(conn, batches))
        conn.close()
    return batches * BATCH_K / secs


# ---------------------------------------------------------------------------------------------------------------
# 5. Claim time against queue depth


def bench_depth(parent: str | None, queued: int, n: int, users: int, warm: int, cardq_first: bool
                ) -> tuple[float, float, float]:
    """Mean seconds per claim(k=1)+complete with `queued` jobs waiting: (cardq, raw same SQL, fill seconds).

    One freshly built database per call, queued through the real store.submit.submit; cardq and the raw loop take
    turns on it (which goes first alternates between repeats), and it holds >= `queued` jobs throughout.
    """
    with fresh_dir(parent) as d:
        path = d / "q.db"
        db = open_cardq(path)
        t0 = time.perf_counter()
        fill(db, queued + 2 * (n + warm), users)
        fill_s = time.perf_counter() - t0
        db.close()
        out: dict[str, float] = {}
        for who in (("cardq", "raw") if cardq_first else ("raw", "cardq")):
            if who == "cardq":
                db = open_cardq(path, worker=True)
                cardq_claim_complete_one(db, warm)
                out[who] = timed(lambda db=db: cardq_claim_complete_one(db, n)) / n
                db.close()
            else:
                conn = open_raw(path, like_cardq=True, worker=True)
                raw_claim_complete_one(conn, warm, 10**12)  # tokens cardq's random ones will not meet
                out[who] = timed(lambda conn=conn: raw_claim_complete_one(conn, n, 10**12 + warm)) / n
                conn.close()
    return out["cardq"], out["raw"], fill_s


# ---------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class Row:
    num: str
    label: str
    cardq: float | None  # jobs/s, or seconds per job when per_job
    floor: float | None
    target: str = ""
    passed: bool | None = None
    per_job: bool = False
    ratio_of: float | None = None  # for a context row: cardq's figure to compare with this floor
    cardq_text: str = ""  # shown instead of a number (the growth row)
    floor_text: str = ""

    def ratio(self) -> float | None:
        mine = self.cardq if self.cardq is not None else self.ratio_of
        if mine is None or self.floor is None:
            return None
        return self.floor / mine if self.per_job else mine / self.floor


def fmt(value: float | None, per_job: bool) -> str:
    if value is None:
        return ""
    return f"{value * 1e6:,.0f} µs/job" if per_job else f"{value:,.0f} jobs/s"


def best(values: list[float], *, lower: bool = False) -> float:
    return min(values) if lower else max(values)


def show_runs(label: str, runs: dict[str, list[float]], per_job: bool = False) -> None:
    parts = [f"{name} " + " / ".join(fmt(v, per_job).split()[0] for v in vals) for name, vals in runs.items()]
    unit = "µs/job" if per_job else "jobs/s"
    print(f"  {label} ({unit}, each run): " + "; ".join(parts), flush=True)


def table(rows: list[Row]) -> str:
    head = ["#", "figure", "cardq", "raw floor", "cardq/floor", "target", "result"]
    body = []
    for r in rows:
        ratio = r.ratio()
        ratio_s = "" if ratio is None else (f"{ratio:.2f}" if r.cardq is not None else f"({ratio:.2f})")
        result = "" if r.passed is None else ("PASS" if r.passed else "FAIL")
        body.append([r.num, r.label, r.cardq_text or fmt(r.cardq, r.per_job), r.floor_text or fmt(r.floor, r.per_job),
                     ratio_s, r.target, result])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    right = {2, 3, 4}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (100k instead of 1M queued, fewer jobs)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported (3)")
    ap.add_argument("--dir", default=None, help="parent folder for the temp databases (default: the system temp)")
    args = ap.parse_args()
    quick, reps, parent = args.quick, max(1, args.repeats), args.dir

    batch_n = 100_000
    single_n, single_users, single_warm = (2_000, 50, 200) if quick else (5_000, 50, 300)
    one_n, one_users, one_warm = (2_000, 50, 200) if quick else (5_000, 50, 300)
    many_batches, many_users, many_warm = ((20_000 if quick else 50_000) // BATCH_K, 10, 20)
    small_q, big_q = 10_000, (100_000 if quick else 1_000_000)
    depth_n, depth_users, depth_warm = (1_000, 10, 200) if quick else (2_000, 10, 300)

    started = time.perf_counter()
    where = parent or tempfile.gettempdir()
    print(f"cardq store benchmark ({'--quick' if quick else 'full spec'}): best of {reps} runs per measurement; "
          "each run in a fresh temp database")
    print(f"python {platform.python_version()}, apsw {apsw.apsw_version()}, SQLite {apsw.sqlite_lib_version()}, "
          f"{os.cpu_count()} CPUs, {platform.platform()}, databases under {where}")
    print("all connections: journal_mode=WAL, synchronous=NORMAL (raw: one pragma per call, read back)")

    same = check_same_sql(parent)
    if same.problems:
        print("WARNING: the 'same SQL' raw loops no longer match what cardq runs:")
        for p in same.problems:
            print("  - " + p)
    else:
        print("same-SQL check: traced cardq's submit/claim/complete calls and the raw loops side by side: the same "
              "statements in the same transactions, the same connection settings (QPSG on), the same rows after "
              f"({', '.join(f'{what}: {n}' for what, n in same.statements.items())} statements, BEGIN/COMMIT "
              "included)")

    # Warm the interpreter, the imports and the file system once before anything is timed.
    bench_one_cardq(parent, 200, 5, 50)
    bench_one_raw(parent, 200, 5, 50)

    rows: list[Row] = []

    print(f"\n[1] batch submit of {batch_n:,} jobs, one user, one call / one transaction")
    r1: dict[str, list[float]] = {"cardq": [], "raw jobs table": [], "raw minimal table": []}
    for _ in range(reps):
        r1["cardq"].append(bench_batch_cardq(parent, batch_n))
        r1["raw jobs table"].append(bench_batch_raw_jobs(parent, batch_n))
        r1["raw minimal table"].append(bench_batch_raw_mini(parent, batch_n))
    show_runs("runs", r1)
    c1 = best(r1["cardq"])
    rows.append(Row("1", f"batch submit, {batch_n // 1000}k jobs, 1 user (1 tx)", c1, best(r1["raw jobs table"]),
                    ">= 150,000 jobs/s", c1 >= 150_000))
    rows.append(Row("", "  context: raw executemany, minimal 2-column table", None, best(r1["raw minimal table"]),
                    ratio_of=c1))

    print(f"\n[2] single submits, one transaction each: {single_n:,} jobs over {single_users} users")
    same_submit = f"raw cardq's {same.statements['single submit']} statements"
    r2: dict[str, list[float]] = {"cardq": [], "raw 1-row insert": [], same_submit: []}
    for _ in range(reps):
        r2["cardq"].append(bench_single_cardq(parent, single_n, single_users, single_warm))
        r2["raw 1-row insert"].append(bench_single_raw(parent, single_n, single_users, single_warm))
        r2[same_submit].append(bench_single_raw_same_sql(parent, single_n, single_users, single_warm))
    show_runs("runs", r2)
    c2, f2 = best(r2["cardq"]), best(r2["raw 1-row insert"])
    rows.append(Row("2", "single submit, 1 tx each, 50 users", c2, f2, ">= 0.50 x raw", c2 >= 0.5 * f2))
    rows.append(Row("", f"  context: {same_submit} per tx (same SQL)", None, best(r2[same_submit]), ratio_of=c2))

    print(f"\n[3] claim(k=1) + complete, one at a time, one process: {one_n:,} jobs, 2 transactions per job")
    r3: dict[str, list[float]] = {"cardq": [], "raw same SQL": [], "raw minimal (FIELD_NOTES)": []}
    for _ in range(reps):
        r3["cardq"].append(bench_one_cardq(parent, one_n, one_users, one_warm))
        r3["raw same SQL"].append(bench_one_raw(parent, one_n, one_users, one_warm))
        r3["raw minimal (FIELD_NOTES)"].append(bench_one_mini(parent, one_n, one_warm))
    show_runs("runs", r3)
    c3, f3 = best(r3["cardq"]), best(r3["raw same SQL"])
    rows.append(Row("3", "claim k=1 + complete, 2 tx/job", c3, f3, ">= 0.70 x raw", c3 >= 0.7 * f3))
    rows.append(Row("", "  context: FIELD_NOTES minimal floor (5-col table)", None,
                    best(r3["raw minimal (FIELD_NOTES)"]), ratio_of=c3))

    many_jobs = many_batches * BATCH_K
    print(f"\n[4] claim(k={BATCH_K}) + complete_many, {many_jobs:,} jobs over {many_users} users")
    r4: dict[str, list[float]] = {"cardq": [], "cardq worker loop": [], "raw same SQL, 2 tx": [],
                                  "raw same SQL, 1 tx": [], "raw minimal, 1 tx": []}
    for _ in range(reps):
        r4["cardq"].append(bench_many_cardq(parent, many_batches, many_users, many_warm))
        r4["cardq worker loop"].append(bench_many_cardq(parent, many_batches, many_users, many_warm,
                                                        loop=cardq_worker_loop))
        r4["raw same SQL, 2 tx"].append(bench_many_raw(parent, many_batches, many_users, many_warm, one_tx=False))
        r4["raw same SQL, 1 tx"].append(bench_many_raw(parent, many_batches, many_users, many_warm, one_tx=True))
        r4["raw minimal, 1 tx"].append(bench_many_mini(parent, many_batches, many_warm))
    show_runs("runs", r4)
    c4 = best(r4["cardq"])
    rows.append(Row("4", f"claim k={BATCH_K} + complete_many (2 tx/batch)", c4, best(r4["raw same SQL, 2 tx"]),
                    ">= 100,000 jobs/s", c4 >= 100_000))
    c4w = best(r4["cardq worker loop"])
    rows.append(Row("", "  worker loop: finish_and_claim, 1 tx/batch", c4w, best(r4["raw same SQL, 1 tx"]),
                    ">= 100,000 jobs/s", c4w >= 100_000))
    rows.append(Row("", "  context: FIELD_NOTES minimal floor, 1 tx", None, best(r4["raw minimal, 1 tx"]),
                    ratio_of=c4))

    print(f"\n[5] claim(k=1) + complete mean time, {small_q:,} vs {big_q:,} jobs queued "
          f"({depth_n:,} timed after {depth_warm} warm-up; queue filled via store.submit.submit, "
          f"{SUBMIT_CHUNK:,} per call)")
    r5: dict[int, dict[str, list[float]]] = {q: {"cardq": [], "raw same SQL": []} for q in (small_q, big_q)}
    for rep in range(reps):
        for q in (small_q, big_q):
            c, r, fill_s = bench_depth(parent, q, depth_n, depth_users, depth_warm, cardq_first=rep % 2 == 0)
            r5[q]["cardq"].append(c)
            r5[q]["raw same SQL"].append(r)
            if q == big_q:
                print(f"  run {rep + 1}: filled {q:,} jobs in {fill_s:.1f} s via submit "
                      f"({q / fill_s:,.0f} jobs/s)", flush=True)
    for q in (small_q, big_q):
        show_runs(f"{q:,} queued", r5[q], per_job=True)
    cs, rs = best(r5[small_q]["cardq"], lower=True), best(r5[small_q]["raw same SQL"], lower=True)
    cb, rb = best(r5[big_q]["cardq"], lower=True), best(r5[big_q]["raw same SQL"], lower=True)
    rows.append(Row("5", f"claim k=1 + complete, {small_q // 1000:,}k queued", cs, rs, per_job=True))
    big_label = f"{big_q // 1_000_000}M" if big_q >= 1_000_000 else f"{big_q // 1000:,}k"
    rows.append(Row("", f"claim k=1 + complete, {big_label} queued", cb, rb, per_job=True))
    growth_c, growth_r = cb / cs, rb / rs
    rows.append(Row("", f"  time growth, {small_q // 1000}k -> {big_label} queued", None, None, "<= 2.0x",
                    growth_c <= 2.0, cardq_text=f"{growth_c:.2f}x", floor_text=f"{growth_r:.2f}x"))

    elapsed = time.perf_counter() - started
    print(f"\nResults: best of {reps} runs each; ratio = cardq ÷ floor in throughput (a context row compares its "
          "floor with cardq's figure just above it);")
    print(f"raw floors measured in this run, same machine, WAL + synchronous=NORMAL. Total time {elapsed:.0f} s.\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
