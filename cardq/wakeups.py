"""When to wake idle workers: when someone made jobs runnable and rang the doorbell, or when a job in backoff
became due — never by polling the database.

The doorbell (doorbell.py) is rung by whoever makes jobs runnable; the supervisor waits on it with everything
else, so with nothing to do it sleeps.

Why not watch the database: its change counter (PRAGMA data_version) moves on every commit of every process —
the actors' rate-limit checks and traffic events included — so idle workers were woken for nothing, and
comparing it every 2 ms cost the idle supervisor ~12 % of a core.

Jobs made runnable by nobody who rings (a row written by hand) are still found: idle workers look for work every
few seconds anyway (worker.IDLE_POLL_S). Jobs in backoff are woken for at their due time, which is re-read at every
ring (a worker that schedules a retry rings) and every DUE_REFRESH_S.
"""

from __future__ import annotations

import time

from cardq.store import Database, jobs

DUE_REFRESH_S = 30.0  # how often the earliest job in backoff is looked up again, besides at every ring


class Wakeups:
    """Whether idle workers should look for work now: a ring, or a job in backoff that became due."""

    def __init__(self, db: Database):
        self.db = db
        self.rung = True  # at start: look once
        self.next_due: float | None = None  # epoch seconds: the earliest job in backoff
        self.due_read_at = 0.0  # monotonic
        self.fired: float | None = None  # the due time last woken for: never again (it stays until claimed)

    def due(self, wall: float | None = None) -> bool:
        wall = time.time() if wall is None else wall
        mono = time.monotonic()
        if self.rung or mono >= self.due_read_at + DUE_REFRESH_S:  # (a worker rings when it schedules a retry)
            self.due_read_at = mono
            self.next_due = jobs.next_run_at(self.db)
            if self.next_due is not None and self.next_due == self.fired:
                # Still waiting for a claim (the workers are busy): woken for already. Look again in a second (a
                # later one may be hidden behind it). (With none in backoff at all, both are None: no hurry.)
                self.next_due = None
                self._look_again_in(1.0, mono)
        scheduled = self.next_due is not None and wall >= self.next_due
        if scheduled:
            self.fired, self.next_due = self.next_due, None
            self._look_again_in(1.0, mono)  # the next one
        rung, self.rung = self.rung, False
        return rung or scheduled

    def _look_again_in(self, seconds: float, mono: float) -> None:
        """Look up the earliest job in backoff again `seconds` after `mono`, not DUE_REFRESH_S."""
        self.due_read_at = mono - DUE_REFRESH_S + seconds

    def seconds_to_next(self, wall: float | None = None) -> float:
        """How long the supervisor may sleep before `due` could say yes by itself (rings wake it anyway)."""
        wall = time.time() if wall is None else wall
        until_refresh = self.due_read_at + DUE_REFRESH_S - time.monotonic()
        if self.next_due is None:
            return max(0.0, until_refresh)
        return max(0.0, min(until_refresh, self.next_due - wall))
