"""The supervisor's published view of its process tree (table `processes`), so `cardq status` — another
process — can show which supervisor, config and workers are in effect. Rewritten whole on each publish."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import apsw
import msgspec
import orjson

from cardq.store.db import Database


class ProcessRow(msgspec.Struct, frozen=True):
    name: str  # "supervisor", "worker-1", ...
    role: str
    pid: int | None
    state: str  # starting / idle / busy / blocked (waiting for the database to take writes) / stopping / ...
    current_job: int | None = None
    jobs_done: int = 0
    restarts: int = 0
    last_exit: str | None = None
    started_at: float | None = None
    info: dict[str, Any] = msgspec.field(default_factory=dict)


def publish(db: Database, rows: Sequence[ProcessRow], *, now: float | None = None) -> None:
    """Replace the published rows with `rows`, atomically."""
    now = time.time() if now is None else now

    def tx(c: apsw.Connection) -> None:
        c.execute("DELETE FROM processes")
        c.executemany(
            "INSERT INTO processes (name, role, pid, state, current_job, jobs_done, restarts, last_exit,"
            " started_at, heartbeat_at, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.name, r.role, r.pid, r.state, r.current_job, r.jobs_done, r.restarts, r.last_exit, r.started_at,
              now, orjson.dumps(r.info).decode()) for r in rows],
        )

    db.write(tx, "publish status")


def clear(db: Database) -> None:
    """Remove every published row (a supervisor that stops publishes nothing)."""
    db.write(lambda c: c.execute("DELETE FROM processes"), "clear status")


def read_all(db: Database) -> list[dict[str, Any]]:
    """The published rows, from one snapshot."""
    return db.read(read, "read status")


def read(c: apsw.Connection) -> list[dict[str, Any]]:
    """The published rows (call inside a read transaction)."""
    cols = ("name", "role", "pid", "state", "current_job", "jobs_done", "restarts", "last_exit", "started_at",
            "heartbeat_at", "info")
    out = []
    for row in c.execute(f"SELECT {', '.join(cols)} FROM processes ORDER BY role DESC, name"):
        rec = dict(zip(cols, row, strict=True))
        rec["info"] = orjson.loads(rec["info"])
        out.append(rec)
    return out
