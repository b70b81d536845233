"""Writer processes for the WAL tests (spawned: they import this module by name)."""

from __future__ import annotations

import os
import time

from cardq.store import Database


def update_loop(path: str, seconds: float) -> None:
    """Commit one-row UPDATEs as fast as one process can for `seconds`: the WAL grows by a page or two per
    commit while the database file stays small (the same 1,000 rows, rewritten)."""
    db = Database.open(path, autocheckpoint=False)  # as workers and actors: the supervisor checkpoints
    blob = os.urandom(300)
    stop_at = time.monotonic() + seconds
    i = 0
    while time.monotonic() < stop_at:
        i += 1
        db.write(lambda c, i=i: c.execute("UPDATE t SET v = ? WHERE id = ?", (blob, i % 1000 + 1)))
    db.close()
