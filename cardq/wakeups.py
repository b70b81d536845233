"""When to wake idle workers: when someone made jobs runnable and rang the doorbell, or when a job in backoff
became due — never by polling the database.

The doorbell is a Unix datagram socket in the run directory (0600, in a 0700 folder: only cardq's user can ring).
Whoever makes jobs runnable — a submit, a retry, through the API or the CLI — rings it after the commit: one
`sendto` that never blocks and never fails the caller (no supervisor: nobody to tell; a full socket buffer:
wake-ups are already pending). The supervisor waits on it with everything else, so with nothing to do it sleeps.

Why not watch the database: its change counter (PRAGMA data_version) moves on every commit of every process —
the actors' rate-limit checks and traffic events included — so idle workers were woken for nothing, and
comparing it every 2 ms cost the idle supervisor ~12 % of a core.

Jobs made runnable by nobody who rings (a row written by hand) are still found: idle workers look for work once
a second anyway (worker.IDLE_POLL_S), and the next due time of jobs in backoff is re-read once a second.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from cardq.store import Database, jobs

DOORBELL = "wake.sock"
DUE_REFRESH_S = 1.0  # how often the earliest job in backoff is looked up again


def ring(run_dir: Path) -> None:
    """Tell the supervisor that jobs became runnable. Never blocks, never raises."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.sendto(b"!", str(run_dir / DOORBELL))


class Doorbell:
    """The supervisor's end of the doorbell."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / DOORBELL
        fresh = run_dir / f".wake.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)  # 0600 from the start: no window in which another user could ring
        try:
            self.sock.bind(str(fresh))
        finally:
            os.umask(old)
        os.replace(fresh, self.path)  # a dead predecessor's socket file is simply replaced
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Take every ring waiting; whether there was any."""
        rang = False
        while True:
            try:
                self.sock.recv(64)
                rang = True
            except (BlockingIOError, InterruptedError):
                return rang
            except OSError:
                return rang

    def gone(self) -> bool:
        """Was our socket file removed (the run directory deleted under us)? Then make a new Doorbell."""
        return not self.path.exists()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class Wakeups:
    """Whether idle workers should look for work now: a ring, or a job in backoff that became due."""

    def __init__(self, db: Database):
        self.db = db
        self.rung = True  # at start: look once
        self.next_due: float | None = None  # epoch seconds: the earliest job in backoff
        self.due_read_at = 0.0  # monotonic

    def due(self, wall: float | None = None) -> bool:
        wall = time.time() if wall is None else wall
        mono = time.monotonic()
        if mono >= self.due_read_at + DUE_REFRESH_S:
            self.due_read_at = mono
            self.next_due = jobs.next_run_at(self.db)
        scheduled = self.next_due is not None and wall >= self.next_due
        if scheduled:
            self.next_due = None
            self.due_read_at = 0.0  # look up the next one at once
        rung, self.rung = self.rung, False
        return rung or scheduled

    def seconds_to_next(self, wall: float | None = None) -> float:
        """How long the supervisor may sleep before `due` could say yes by itself (rings wake it anyway)."""
        wall = time.time() if wall is None else wall
        until_refresh = self.due_read_at + DUE_REFRESH_S - time.monotonic()
        if self.next_due is None:
            return max(0.0, until_refresh)
        return max(0.0, min(until_refresh, self.next_due - wall))
