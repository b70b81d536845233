"""Concurrency-gate permits (the RateLimiter actor's): one row per permit held, so permits survive an actor
restart. The holder is a process, named by pid and its start time (a reused pid is not the holder)."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from cardq.store.db import Database, Tx


class Permit(NamedTuple):
    permit_id: str
    gate: str
    pid: int
    pid_started: int  # clock ticks since boot (/proc/<pid>/stat), 0 if unknown
    acquired_at: float


def permits(db: Database) -> list[Permit]:
    """Every permit held now."""
    return db.read(lambda c: [Permit(*r) for r in c.execute(
        "SELECT permit_id, gate, pid, pid_started, acquired_at FROM gate_permits")], "load gate permits")


def add(tx: Tx, permit: Permit) -> None:
    """Record a permit granted (one row: it survives an actor restart)."""
    tx.c.execute("INSERT INTO gate_permits (permit_id, gate, pid, pid_started, acquired_at) VALUES (?, ?, ?, ?, ?)",
                 permit)


def remove(tx: Tx, permit_id: str) -> None:
    """A permit given back or reaped (nothing if it is not held)."""
    tx.c.execute("DELETE FROM gate_permits WHERE permit_id = ?", (permit_id,))


def remove_unknown(db: Database, known_gates: Collection[str]) -> int:
    """Drop the permits of gates no longer configured (renamed or removed: their permits mean nothing now);
    returns how many."""
    def tx(c) -> int:
        marks = ",".join("?" * len(known_gates))
        c.execute(f"DELETE FROM gate_permits WHERE gate NOT IN ({marks})", tuple(known_gates))
        return c.changes()

    return db.write(tx, "drop unknown gates' permits")
