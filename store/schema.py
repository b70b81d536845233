"""Schema, versioned by PRAGMA user_version, identified as cardq's by PRAGMA application_id.

Each migration runs in its own IMMEDIATE transaction and re-reads the version inside it, so two processes
opening a database at the same moment apply each migration exactly once. Each applied version is also recorded,
with its time, in `schema_migrations`.

Job states (see store/jobs.py for the transitions):
  queued      waiting to be claimed
  scheduled   waiting for run_at (a retry in backoff), then promoted to queued
  processing  claimed: lease_owner, lease_token and lease_until are set
  done        finished; result holds the handler's return value
  dead        the dead-letter state: out of attempts, or failed permanently; last_error and errors kept
  cancelled   cancelled by an operator
"""

from __future__ import annotations

import time
from pathlib import Path

import apsw

from cardq.errors import StoreError
from cardq.store.totals import DURATION_BOUNDS
from cardq.vocabulary import ACTIVE_STATUSES, STATUSES  # noqa: F401 - (re-exported for the store)

APPLICATION_ID = 0x63617264  # "card"


def _bucket_sql(seconds: str) -> str:
    """The job duration bucket of `seconds` (an SQL expression), as SQL text: its upper bound as store/totals.py
    writes it in a done:<le> event ("0.005", ..., "inf")."""
    finite = [b for b in DURATION_BOUNDS if b != float("inf")]
    return "CASE " + " ".join(f"WHEN {seconds} <= {b!r} THEN '{b!r}'" for b in finite) + " ELSE 'inf' END"


MIGRATIONS: list[str] = [
    # v1: jobs, their per-user counters, limits overrides, scheduler state.
    f"""
    CREATE TABLE jobs (
        id              INTEGER PRIMARY KEY,
        user_id         TEXT    NOT NULL,
        plan            TEXT    NOT NULL,
        kind            TEXT    NOT NULL,
        payload         TEXT    NOT NULL,
        status          TEXT    NOT NULL CHECK (status IN {STATUSES!r}),
        priority        INTEGER NOT NULL DEFAULT 0 CHECK (priority >= 0),
        vt              INTEGER NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL CHECK (max_attempts >= 1),
        run_at          REAL    NOT NULL,
        lease_owner     TEXT,
        lease_token     INTEGER,
        lease_until     REAL,
        last_error      TEXT,
        errors          TEXT    NOT NULL DEFAULT '[]',
        result          TEXT,
        created_at      REAL    NOT NULL,
        updated_at      REAL    NOT NULL,
        started_at      REAL,
        finished_at     REAL,
        idempotency_key TEXT,
        CHECK ((status = 'processing') = (lease_token IS NOT NULL))
    );
    -- The claim order: priority first, then the fair-share virtual time, then age (rowid). Partial, so done
    -- jobs cost nothing and a claim is one index seek however many jobs exist.
    CREATE INDEX jobs_ready ON jobs (priority DESC, vt) WHERE status = 'queued';
    CREATE INDEX jobs_scheduled ON jobs (run_at) WHERE status = 'scheduled';
    CREATE INDEX jobs_leased ON jobs (lease_until) WHERE status = 'processing';
    CREATE INDEX jobs_user ON jobs (user_id);
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

    -- One row per user, all the user's counters on one page so a claim or completion dirties one page for them:
    -- jobs queued, scheduled or processing; the virtual time of the user's last queued job (fair share, see
    -- store/fairness.py); jobs done on done_day (the local day in limits.timezone), for the daily plan limits.
    CREATE TABLE user_load (
        user_id    TEXT PRIMARY KEY,
        active     INTEGER NOT NULL DEFAULT 0 CHECK (active >= 0),
        last_vt    INTEGER NOT NULL DEFAULT 0,
        done_day   TEXT    NOT NULL DEFAULT '',
        done_today INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    -- Failed attempts and dead jobs per local day, for `cardq status`.
    CREATE TABLE daily_stats (
        day    TEXT PRIMARY KEY,
        failed INTEGER NOT NULL DEFAULT 0,
        dead   INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    -- Operator overrides of limits (the old limits_config): effective value = this > config.toml > built-in.
    CREATE TABLE limits (
        key        TEXT PRIMARY KEY,
        value      INTEGER NOT NULL,
        updated_at REAL    NOT NULL
    ) WITHOUT ROWID;

    -- One row: the largest virtual time assigned (store/fairness.py) and the next job id (never reused, even
    -- after a purge).
    CREATE TABLE sched (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        vt          INTEGER NOT NULL,
        next_job_id INTEGER NOT NULL
    );
    INSERT INTO sched (id, vt, next_job_id) VALUES (1, 0, 1);
    """,
    # v2: supervision. `kills` counts attempts that ended with their worker process dying (poison jobs);
    # `processes` is the supervisor's published view of itself and its children, for `cardq status`.
    """
    ALTER TABLE jobs ADD COLUMN kills INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE processes (
        name         TEXT PRIMARY KEY,
        role         TEXT    NOT NULL,
        pid          INTEGER,
        state        TEXT    NOT NULL,
        current_job  INTEGER,
        jobs_done    INTEGER NOT NULL DEFAULT 0,
        restarts     INTEGER NOT NULL DEFAULT 0,
        last_exit    TEXT,
        started_at   REAL,
        heartbeat_at REAL    NOT NULL,
        info         TEXT    NOT NULL DEFAULT '{}'
    ) WITHOUT ROWID;
    """,
    # v3: actors. Each table is owned by one actor (its single writer, like a Durable Object's storage), except
    # that the job store moves `usage:` counters (user_load) too, in its own transactions.
    """
    CREATE TABLE counters (
        key        TEXT PRIMARY KEY,
        value      INTEGER NOT NULL,
        updated_at REAL    NOT NULL
    ) WITHOUT ROWID;
    -- op ids already applied, with the answer given, so a retried ask is applied once (pruned after a day).
    CREATE TABLE counter_ops (
        op_id TEXT PRIMARY KEY,
        ok    INTEGER NOT NULL,
        value INTEGER NOT NULL,
        at    REAL    NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE rate_limits (
        key TEXT PRIMARY KEY,
        tat REAL NOT NULL  -- GCRA theoretical arrival time
    ) WITHOUT ROWID;
    CREATE TABLE gate_permits (
        permit_id   TEXT PRIMARY KEY,
        gate        TEXT    NOT NULL,
        pid         INTEGER NOT NULL,
        pid_started INTEGER NOT NULL,  -- the holder's start time (/proc): a reused pid is not the holder
        acquired_at REAL    NOT NULL
    ) WITHOUT ROWID;
    -- Messages that made their actor fail 3 times: kept here instead of crash-looping the actor.
    CREATE TABLE actor_dead_letters (
        id          INTEGER PRIMARY KEY,
        actor       TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        message     TEXT NOT NULL,
        error       TEXT NOT NULL,
        failures    INTEGER NOT NULL,
        at          REAL NOT NULL
    );
    CREATE TABLE actor_failures (
        fingerprint TEXT PRIMARY KEY,
        actor       TEXT    NOT NULL,
        failures    INTEGER NOT NULL,
        last_error  TEXT    NOT NULL,
        at          REAL    NOT NULL
    ) WITHOUT ROWID;
    -- Traffic events, idempotent by id ("<ts_ms>-<8 hex>"); client IPs only as a keyed hash.
    CREATE TABLE traffic_events (
        id          TEXT PRIMARY KEY,
        ts_ms       INTEGER NOT NULL,
        path        TEXT    NOT NULL,
        method      TEXT    NOT NULL,
        status      INTEGER NOT NULL,
        response_ms REAL    NOT NULL,
        client      TEXT    NOT NULL,
        bytes       INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE path_stats_hourly (
        path        TEXT    NOT NULL,
        hour        INTEGER NOT NULL,  -- epoch seconds of the hour's start (UTC)
        requests    REAL    NOT NULL,
        status_4xx  REAL    NOT NULL,
        status_5xx  REAL    NOT NULL,
        bytes       REAL    NOT NULL,
        ms_sum      REAL    NOT NULL,
        ms_min      REAL    NOT NULL,
        ms_max      REAL    NOT NULL,
        latency     BLOB    NOT NULL,  -- KLL quantile sketch (Apache DataSketches), mergeable
        clients     BLOB    NOT NULL,  -- HLL sketch of client hashes: exact while small
        estimated   INTEGER NOT NULL,  -- 1 when counts are scaled up from a sample (sampling_rate < 1)
        PRIMARY KEY (hour, path)
    ) WITHOUT ROWID;
    -- Events written here when the collector is unavailable; it drains them when it is back.
    CREATE TABLE traffic_inbox (
        id    INTEGER PRIMARY KEY,
        shard INTEGER NOT NULL,  -- the collector shard that owns the event's (normalized) path
        event TEXT    NOT NULL
    );
    CREATE INDEX traffic_inbox_shard ON traffic_inbox (shard, id);
    """,
    # v4: an op id remembers the request it was for ("incr cards:made 5"), so one reused for a different
    # request is refused instead of silently answered with the first request's result ('' for older rows).
    """
    ALTER TABLE counter_ops ADD COLUMN request TEXT NOT NULL DEFAULT '';
    """,
    # v5: bearer tokens of the HTTP API, kept as SHA-256 digests (a token is 32 random bytes: a fast hash is
    # enough, and the plain token is shown once, at creation).
    """
    CREATE TABLE api_tokens (
        id           INTEGER PRIMARY KEY,
        name         TEXT    NOT NULL,
        scope        TEXT    NOT NULL CHECK (scope IN ('read', 'app', 'admin')),
        digest       TEXT    NOT NULL UNIQUE,
        created_at   REAL    NOT NULL,
        revoked_at   REAL
    );
    """,
    # (status page; renumber on merge) finished jobs by time: the status page's jobs-per-minute over the last
    # hour (queries.finished_per_minute) counts a range of this index, never the table; purge's cutoff uses it
    # too. Partial: queued and processing jobs have no entry. Covering (status), so the count reads no rows.
    # Finished times grow, so a completion appends at the index's right edge (one hot page).
    """
    CREATE INDEX jobs_finished ON jobs (finished_at, status) WHERE finished_at IS NOT NULL;
    """,
    # v7: durable totals for /metrics (see store/totals.py), seeded from the rows a database upgraded from v6 holds:
    # submitted = its jobs, failed = their recorded errors (the newest 25 per job are kept: a floor), dead,
    # cancelled and done durations from the jobs in those states — so that the jobs in each finished state stay a
    # difference of totals (and claims, done + failed + processing). Kinds past the 50 most frequent are counted
    # as "(other)".
    f"""
    CREATE TABLE job_totals (
        kind    TEXT    NOT NULL,
        event   TEXT    NOT NULL,  -- submitted, failed, dead, cancelled, released, left_<state>, done:<le>
        n       INTEGER NOT NULL,
        seconds REAL    NOT NULL DEFAULT 0,  -- done:<le>: the durations of those n jobs, summed
        PRIMARY KEY (kind, event)
    ) WITHOUT ROWID;
    CREATE TABLE limit_rejections (
        limit_key TEXT PRIMARY KEY,
        n         INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TEMP TABLE seed_kinds AS SELECT kind, CASE WHEN row_number() OVER (ORDER BY count(*) DESC, kind) <= 50
        THEN kind ELSE '(other)' END AS label FROM jobs GROUP BY kind;
    INSERT INTO job_totals (kind, event, n)
        SELECT label, 'submitted', count(*) FROM jobs JOIN seed_kinds USING (kind) GROUP BY label;
    INSERT INTO job_totals (kind, event, n)
        SELECT label, 'failed', sum(json_array_length(errors)) FROM jobs JOIN seed_kinds USING (kind) GROUP BY label
        HAVING sum(json_array_length(errors)) > 0;
    INSERT INTO job_totals (kind, event, n)
        SELECT label, status, count(*) FROM jobs JOIN seed_kinds USING (kind)
        WHERE status IN ('dead', 'cancelled') GROUP BY label, status;
    INSERT INTO job_totals (kind, event, n, seconds)
        SELECT label, 'done:' || {_bucket_sql("max(finished_at - started_at, 0)")}, count(*),
               sum(max(finished_at - started_at, 0))
        FROM jobs JOIN seed_kinds USING (kind) WHERE status = 'done' GROUP BY 1, 2;
    DROP TABLE seed_kinds;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def check_identity(conn: apsw.Connection, path: Path, *, allow_fresh: bool) -> None:
    """Refuse anything but a cardq database (or, with allow_fresh, an empty file). Reads only."""
    app_id = conn.execute("PRAGMA application_id").fetchall()[0][0]
    if app_id == APPLICATION_ID:
        version = conn.execute("PRAGMA user_version").fetchall()[0][0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: database schema v{version} was written by a newer cardq; this cardq knows up to "
                f"v{SCHEMA_VERSION}: upgrade cardq (the file was left untouched)"
            )
        return
    objects = conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()[0][0]
    version = conn.execute("PRAGMA user_version").fetchall()[0][0]
    if app_id == 0 and objects == 0 and version == 0:
        if allow_fresh:
            return
        raise StoreError(f"{path}: empty database; run `cardq init` to create it")
    raise StoreError(f"{path}: a SQLite database, but not a cardq one (refused, file left untouched)")


def current_version(conn: apsw.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchall()[0][0]


def migrate(conn: apsw.Connection, path: Path) -> int:
    """Apply every migration the file lacks; returns the schema version now in effect."""
    while current_version(conn) < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = current_version(conn)  # re-read under the write lock: another process may have migrated
            if version < SCHEMA_VERSION:
                if version == 0:
                    conn.execute(f"PRAGMA application_id={APPLICATION_ID}").fetchall()
                    conn.execute(
                        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
                    )
                conn.execute(MIGRATIONS[version]).fetchall()  # fetchall: run every statement (apsw is lazy)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version + 1, time.time()))
                conn.execute(f"PRAGMA user_version={version + 1}").fetchall()
            conn.execute("COMMIT")
        except BaseException:
            if not conn.getautocommit():
                conn.execute("ROLLBACK")
            raise
    return current_version(conn)
