"""Every error cardq raises to its users, under one base, `cardq.Error`.

Each one's str() is a complete one-line message naming the input, the problem and what is expected; each carries
its data as attributes, so an app can act on it without parsing text. No exit codes here: the CLI maps error
types to exit codes in one table (cli.py), and an HTTP layer maps them to status codes its own way.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class Error(Exception):
    """Base of every cardq error: str(e) is a complete one-line message."""


class ConfigError(Error):
    """config.toml (or a value given for it) is invalid; the message names the key and what is expected."""


class InputError(Error):
    """Bad input: a file, a line, an item, a value. `where` names it ("items.jsonl line 7", "item 3"), `index` is
    the item's position in a batch (0-based) when there is one, `reason` what is wrong and what is expected."""

    def __init__(self, message: str, *, where: str | None = None, index: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.where, self.index, self.reason = where, index, reason or message


class LimitExceeded(Error):
    """A submit refused by a limit; nothing was inserted.

    `limit` is the limit's key ("daily.free"), `allowed` its value in effect, `current` what already counts
    against it, `requested` what the batch asked for, and `resets_at` (epoch seconds) when it starts again, for
    limits that reset (the daily plan limits: the next local midnight); None otherwise.
    """

    def __init__(self, message: str, *, limit: str, allowed: int, current: int, requested: int,
                 resets_at: float | None = None):
        super().__init__(message)
        self.limit, self.allowed, self.current, self.requested = limit, allowed, current, requested
        self.resets_at = resets_at


class JobNotFound(Error):
    def __init__(self, job_id: int):
        super().__init__(f"job {job_id}: no such job")
        self.job_id = job_id


class InvalidTransition(Error):
    """An operator action that the job's current status does not allow (cancel a done job, say)."""


class StoreError(Error):
    """The database could not be used (missing, not cardq's, too new, full, read-only, unreadable)."""


class StoreUnwritable(StoreError):
    """The database cannot take writes now, for a reason outside cardq that may pass: its disk is full, or its
    file system is read-only. Nothing was changed. Writers that can wait (workers, actors) wait and retry, and
    resume by themselves once the operator has freed space; `problem` is "disk full" or "read-only"."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


class FileError(Error):
    """A file or folder cardq needs (the lock file, the log file, the run directory, its key) could not be made,
    written or read: `path` names it, `problem` says why in words (disk full, read-only file system, permission
    denied, ...)."""

    def __init__(self, path: str | Path, what: str, e: OSError):
        self.path, self.problem = str(path), os_problem(e, path)
        super().__init__(f"{path}: cannot {what}: {self.problem}")


def os_problem(e: OSError, path: str | Path | None = None) -> str:
    """An OSError in the words an operator acts on, with what to do about it."""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "disk full (no space left on its file system); free space and cardq carries on"
    if code == errno.EROFS or (path is not None and read_only_fs(path)):
        return "read-only file system; remount it read-write, or configure a path on a writable one"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied; check the owner and mode of the file and of its folder"
    if code == errno.ENOENT:
        return "no such file or folder"
    return e.strerror or str(e)


def read_only_fs(path: str | Path) -> bool:
    """Is the file system that holds `path` (or its nearest existing folder) mounted read-only?"""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class StoreBusy(StoreError):
    """The database stayed locked by another process through every one of the bounded retries."""


class LeaseLost(StoreError):
    """complete/fail/extend by a holder whose lease was taken over (expired and reclaimed, recovered, cancelled)."""


class ActorError(Error):
    """An actor refused a request (bad arguments, a dead-lettered message, ...). `code` says which kind."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class InvalidRequest(ActorError):
    """An actor refused a request as malformed or contradictory: an unknown gate, a cost above the burst, an op id
    already used for a different request. Resending it will not help."""


class ActorTimeout(ActorError):
    """Sent, but no answer within the ask timeout. The request may or may not have been applied; retry with the
    same op_id to have it applied exactly once."""


class ActorUnavailable(ActorError):
    """No actor to reach: no supervisor runs, the actor is turned off, or it did not come back in time."""


class Overloaded(ActorError):
    """A gate's wait queue is full, or no permit came within its wait: the soft "overloaded, retry" answer."""


class NotRunning(Error):
    """No supervisor runs on this database."""


class AlreadyRunning(Error):
    """Another supervisor runs on this database."""


class RestartIntensityExceeded(Error):
    """The supervisor stopped everything because its children kept dying (more than max_restarts restarts
    within max_seconds): a crash loop is escalated to whoever runs the supervisor, not watched forever."""
