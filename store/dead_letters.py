"""Poison messages of the actors: how often each message (by fingerprint) failed, and the dead-letter table
where one that failed 3 times is kept instead of crash-looping its actor."""

from __future__ import annotations

from cardq.store.db import Database, Tx


def failure_counts(db: Database, actor: str) -> dict[str, int]:
    """fingerprint -> failures so far, for one actor's messages."""
    return db.read(lambda c: dict(c.execute(
        "SELECT fingerprint, failures FROM actor_failures WHERE actor = ?", (actor,)).fetchall()), "load failures")


def record_failure(tx: Tx, actor: str, fingerprint: str, error: str, now: float) -> int:
    """Count one failure of a message; returns its count."""
    return tx.c.execute(
        "INSERT INTO actor_failures (fingerprint, actor, failures, last_error, at) VALUES (?, ?, 1, ?, ?)"
        " ON CONFLICT (fingerprint) DO UPDATE SET failures = failures + 1, last_error = excluded.last_error,"
        " at = excluded.at RETURNING failures", (fingerprint, actor, error[:500], now)).fetchall()[0][0]


def count_failure(db: Database, actor: str, fingerprint: str, error: str, now: float) -> int:
    """record_failure in a transaction of its own (the supervisor, when a message killed its actor)."""
    return db.batch(lambda tx: record_failure(tx, actor, fingerprint, error, now), "record actor failure")


def clear_failure(tx: Tx, fingerprint: str) -> None:
    """The message succeeded after all: its count starts again."""
    tx.c.execute("DELETE FROM actor_failures WHERE fingerprint = ?", (fingerprint,))


def add(tx: Tx, actor: str, fingerprint: str, message: str, error: str, failures: int, now: float) -> None:
    """Keep a message that failed for good (its JSON text, the last error) in actor_dead_letters."""
    tx.c.execute("INSERT INTO actor_dead_letters (actor, fingerprint, message, error, failures, at)"
                 " VALUES (?, ?, ?, ?, ?, ?)", (actor, fingerprint, message, error[:500], failures, now))
