"""A concurrency gate's permits as kernel locks: permit i of gate G is an exclusive flock() on the file
<run_dir>/gates/G.<i>, for i below the gate's max_concurrency. Whoever holds the lock holds the permit.

Why locks: taking a free permit is one non-blocking flock() in the caller's own process — about a microsecond,
no actor round trip, no database write — and the kernel gives it back the instant its holder dies, however it
dies (a SIGKILL included). Workers and apps take the same files, so max_concurrency holds across both.

Waiting is the RateLimiter actor's job: a caller that finds no free slot, or finds callers already queued, asks
the actor, which keeps the bounded FIFO queue (max_queue, queue_timeout_ms, "overloaded, retry"), takes a slot
when one frees and holds it for the caller until it is released (or its holder dies). While anyone waits there,
the actor holds G.queue exclusively; a caller that sees that lock joins the queue instead of taking a slot ahead
of those waiting (first come, first served).

Locks belong to an open file description: every holder opens the files itself (two threads must not share one
GateSlots), and a released lock is released for every process that inherited the descriptor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
import weakref
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LINK_CHECK_S = 0.1  # how often the slot files are checked for having been deleted


def gates_dir(run_dir: Path) -> Path:
    return run_dir / "gates"


def file_stem(gate: str) -> str:
    """The gate's name as a file name (any TOML key can name a gate)."""
    return gate if SAFE_NAME.fullmatch(gate) else "g-" + hashlib.sha256(gate.encode()).hexdigest()[:16]


class GateSlots:
    """One holder's handles on one gate's slot files. Not thread-safe: one per thread (or process)."""

    def __init__(self, run_dir: Path, gate: str):
        self.gate = gate
        self.run_dir = run_dir
        self.dir = gates_dir(run_dir)
        self.stem = file_stem(gate)
        self._fds: dict[int | str, int] = {}
        self.held: set[int] = set()
        self._closing = False
        self._checked: dict[int | str, float] = {}  # key -> when its file was last checked for deletion
        # A thread that ends without closing its client must not leave its descriptors behind.
        self._finalizer = weakref.finalize(self, _close_all, self._fds)

    def _fd(self, key: int | str) -> int:
        fd = self._fds.get(key)
        if fd is not None and key not in self.held:
            now = time.monotonic()
            if now - self._checked.get(key, 0.0) >= LINK_CHECK_S:  # (an fstat per take: a tenth of a job's cost)
                self._checked[key] = now
                if os.fstat(fd).st_nlink == 0:
                    # Its file was deleted (the run directory removed and put back): a lock on it would no longer
                    # exclude anyone who opens the new file. Open the new one.
                    os.close(self._fds.pop(key))
                    fd = None
        if fd is None:
            path = self.dir / f"{self.stem}.{key}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # the folder is gone (run_dir deleted): make it again
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fds[key] = fd
            self._checked[key] = time.monotonic()
        return fd

    def try_take(self, limit: int, start: int = 0, *, files: int = 0) -> int | None:
        """Take a free slot below `limit` (trying from `start`, so that holders spread out); its number, or None
        when all are held. Never waits.

        `files`: how many slot files there are (max_concurrency), when that is more than `limit` — an adaptive
        gate whose limit was cut while slots above it were held. Those holders still count: a slot is taken
        only while fewer than `limit` are held in all."""
        for n in range(limit):
            i = (start + n) % limit
            if i in self.held:
                continue
            try:
                fcntl.flock(self._fd(i), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self.held.add(i)
            if files > limit:
                try:
                    over = self._held_above(limit, files) and self._held_in(range(files)) > limit
                except BaseException:  # a probe could not open a file: give the slot back, never keep it
                    self.give(i)
                    raise
                if over:
                    self.give(i)
                    return None
            return i
        return None

    def _held_above(self, limit: int, files: int) -> bool:
        return any(self._is_held(j) for j in range(limit, files))

    def _held_in(self, slots: range) -> int:
        return sum(1 for j in slots if self._is_held(j))

    def _is_held(self, j: int) -> bool:
        """Is slot j held, by this object or by anyone?"""
        return j in self.held or _locked(self._fd(j), fcntl.LOCK_EX)

    def give(self, i: int) -> None:
        """Release slot i (held by this object)."""
        if i in self.held:
            self.held.discard(i)
            with contextlib.suppress(OSError):
                fcntl.flock(self._fds[i], fcntl.LOCK_UN)
            if self._closing and not self.held:
                self.close()

    def queue_waiting(self) -> bool:
        """Is anyone queued at the actor for this gate (does it hold the queue lock)?"""
        return _locked(self._fd("queue"), fcntl.LOCK_SH)

    def mark_queue(self, waiting: bool) -> bool:
        """The actor: hold the queue lock while callers wait (see queue_waiting). Never blocks (a caller checking
        holds it shared for an instant — or, stopped by a signal right then, for longer): False if it could not
        be taken now; try again later."""
        try:
            fcntl.flock(self._fd("queue"), (fcntl.LOCK_EX | fcntl.LOCK_NB) if waiting else fcntl.LOCK_UN)
            return True
        except BlockingIOError:
            return False

    def count_held(self, limit: int) -> int:
        """How many of the slots below `limit` anyone holds now (from /proc/locks; for statistics only)."""
        files = set()
        for i in range(limit):
            with contextlib.suppress(OSError):
                st = os.fstat(self._fd(i))
                files.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
        try:
            text = Path("/proc/locks").read_text()
        except OSError:
            return len(self.held)
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" (a line with "->" is a blocked waiter, not a holder)
        return sum(1 for line in text.splitlines()
                   if (f := line.split()) and len(f) >= 6 and f[1] == "FLOCK" and f[3] == "WRITE" and f[5] in files)

    def close(self) -> None:
        """Close the descriptors — once no slot is held: closing one would give its permit back while its `with`
        block still runs (a client replaced after a config edit, a Queue closed from another thread)."""
        if self.held:
            self._closing = True
            return
        _close_all(self._fds)


def _locked(fd: int, mode: int) -> bool:
    """Does someone hold a lock on fd's file that keeps a `mode` lock out? (A probe: taken and at once given back.)"""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _close_all(fds: dict[int | str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
