"""Rate-limit state (the RateLimiter actor's): one GCRA theoretical arrival time (TAT) per key.

A key with no row, or with a TAT in the past, is fresh: its whole burst is available. Writes run inside the
actor's batch transaction (a `Tx`)."""

from __future__ import annotations

from cardq.store.db import Database, Tx


def load_all(db: Database) -> dict[str, float]:
    """Every key's TAT (the actor's memory, rebuilt at start)."""
    return db.read(lambda c: dict(c.execute("SELECT key, tat FROM rate_limits").fetchall()), "load rate limits")


def save(tx: Tx, key: str, tat: float) -> None:
    """Set one key's TAT (one upsert)."""
    tx.c.execute("INSERT INTO rate_limits (key, tat) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET tat = excluded.tat",
                 (key, tat))


def forget_reset(tx: Tx, now: float) -> None:
    """Drop the keys whose TAT has passed: they are fresh again, and a missing key means exactly that."""
    tx.c.execute("DELETE FROM rate_limits WHERE tat < ?", (now,))
