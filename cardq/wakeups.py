"""When to wake idle workers: when another process committed to the database (its change token moved), or
when a job in backoff became due. Cheap enough to ask every few milliseconds while a worker is idle: the
token is a read of shared memory, and the next due time is re-read only after a change."""

from __future__ import annotations

import time

from cardq.store import Database, jobs


class Wakeups:
    def __init__(self, db: Database):
        self.db = db
        self.token: int | None = None
        self.next_due: float | None = None  # epoch seconds: the earliest job in backoff

    def due(self, wall: float | None = None) -> bool:
        """Should idle workers look for work now?"""
        wall = time.time() if wall is None else wall
        token = self.db.change_token()
        changed = token != self.token
        if changed:
            self.token = token
            self.next_due = jobs.next_run_at(self.db)
        scheduled = self.next_due is not None and wall >= self.next_due
        if scheduled:
            self.next_due = None
        return changed or scheduled
