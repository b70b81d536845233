"""cardq's store: every SQL statement cardq runs, behind named operations over plain values.

This file is the contract. Everything above store/ (the actors, the supervisor and workers, the public API, the
CLI) calls only the operations listed in CONTRACT, with plain values, dataclasses and two handles: a `Database`
(one connection; open one per process or thread, never across a fork) and a `Tx` (a write transaction in
progress, handed out by `Database.batch`, so that several operations commit together, as an actor's batch
does). A second backend (PostgreSQL) implements the same operations with the same guarantees; nothing in these
signatures is SQLite's (`change_token` rather than PRAGMA data_version, opaque bytes for sketches).

Each operation says in its docstring what it guarantees atomically. Operations taking a Database run in one
transaction of their own (writes begin IMMEDIATE and retry a locked database with backoff, then raise
StoreBusy); operations taking a Tx run inside the caller's. Errors are cardq.errors types: StoreError (and
StoreBusy; StoreUnwritable, when a disk is full or read-only and nothing was changed; LeaseLost) for the
database, InputError, LimitExceeded, JobNotFound, InvalidTransition for what the caller asked.

Modules hold their tables: db (connection, pragmas, transactions), schema (versions, migrations), jobs (the job
state machine), submit (batches under limits), admin (operator actions), queries (reads), limits, usage (per-user
counters; the one owner of user_load), fairness, processes (the supervisor's published view), counters,
ratelimits, gates, traffic, dead_letters (the actors' state), tokens (the HTTP API's bearer tokens), totals
(durable job and limit totals, counted in the transactions above, and the snapshot /metrics reads).
"""

from cardq.errors import (
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    LimitExceeded,
    StoreBusy,
    StoreError,
    StoreUnwritable,
)
from cardq.store.db import Database, Tx

# module -> the operations a backend provides (what code above store/ may call).
CONTRACT: dict[str, tuple[str, ...]] = {
    # Database.open(path, synchronous=, busy_timeout_ms=, busy_retries=, timezone=, create=, autocheckpoint=), and
    # on a Database: close, batch(fn), checkpoint, pragmas, schema_version, change_token, days.key(now), tz.
    "db": ("Database", "Tx"),
    "jobs": ("claim", "finish_and_claim", "extend", "complete", "complete_many", "fail", "recover", "give_back",
             "extend_owned", "release_owner", "recover_orphans", "next_run_at"),
    "submit": ("submit", "submit_many"),
    "admin": ("cancel", "retry", "purge"),
    "queries": ("get", "statuses", "list_jobs", "stats", "finished_per_minute"),
    "limits": ("show", "in_effect", "override", "drop_override", "validate", "check_key"),
    "usage": ("pending_total", "day_key", "next_day_start"),
    "processes": ("publish", "clear", "read_all"),
    "counters": ("get", "incr", "incr_if_below", "prune_ops"),
    "ratelimits": ("load_all", "save", "forget_reset"),
    "gates": ("permits", "add", "remove", "remove_unknown"),
    "traffic": ("insert_events", "hour_paths", "load_hour", "save_hour", "hourly", "prune_events", "inbox_add",
                "inbox_take", "inbox_delete"),
    "dead_letters": ("failure_counts", "record_failure", "count_failure", "clear_failure", "add"),
    "tokens": ("add", "scope_of", "list_all", "revoke"),
    "totals": ("snapshot",),
}

# module -> the data types and constants of the contract (what its operations take and return).
TYPES: dict[str, tuple[str, ...]] = {
    "jobs": ("Claimed", "Backoff", "FailOutcome", "Recovered", "Released"),
    "submit": ("NewJob", "SubmitRequest", "SubmitResult", "MAX_PRIORITY"),
    "limits": ("Limit",),
    "schema": ("STATUSES", "ACTIVE_STATUSES", "SCHEMA_VERSION"),
    "processes": ("ProcessRow",),
    "gates": ("Permit",),
    "traffic": ("HourStats", "HourRow", "EventRow"),
    "tokens": ("TokenRow", "SCOPES"),
    "totals": ("Figures", "Histogram", "OTHER"),
}

__all__ = [
    "CONTRACT", "TYPES", "Database", "InvalidTransition", "JobNotFound", "LeaseLost", "LimitExceeded", "StoreBusy",
    "StoreError", "StoreUnwritable", "Tx",
]
