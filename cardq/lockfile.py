"""One supervisor per database: an exclusive flock on `<database>.supervisor`, holding the supervisor's pid.

The kernel releases a flock when its holder dies however it dies, so a stale file left by a SIGKILLed
supervisor is simply taken over: only a live holder is obeyed. Spawned children do not inherit the descriptor.

The lock belongs to the database FILE, not to the name it was reached by: the path is resolved (a symlink to a
database, or to its folder, finds the same lock), and a database file with a second name (a hard link) is
refused, since a lock beside one name could not be seen from the other. (The lock is not taken on the database
file itself: closing any descriptor of a file drops the process's POSIX locks on it — SQLite's own.)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cardq.errors import AlreadyRunning, FileError, NotRunning


def lock_path(db_path: Path) -> Path:
    real = Path(os.path.realpath(db_path))
    return real.with_name(real.name + ".supervisor")


def check_one_name(db_path: Path) -> None:
    """AlreadyRunning's kin: a database reachable under two names could get two supervisors."""
    try:
        links = os.stat(db_path).st_nlink
    except FileNotFoundError:
        return  # created by the supervisor, with one name
    if links > 1:
        raise AlreadyRunning(f"{db_path}: the database file has {links} names (hard links); one supervisor per "
                             "database is guaranteed only for a file with one name: remove the other links")


class SupervisorLock:
    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        check_one_name(self.db_path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise FileError(self.path, "create the supervisor's lock file", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(
                f"another supervisor (pid {holder}) is running on this database ({self.path}); "
                "stop it first with `cardq stop`"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for `cardq stop` and `status`
        except OSError as e:
            os.close(fd)
            raise FileError(self.path, "write the supervisor's pid to its lock file", e) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def running_pid(db_path: Path) -> int:
    """The pid of the live supervisor of this database; NotRunning if none holds the lock."""
    path = lock_path(db_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotRunning(f"no supervisor is running on {db_path} (no {path.name})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            if pid is None:
                raise NotRunning(f"{path}: locked but holds no pid; is a supervisor starting?") from None
            return pid
        raise NotRunning(f"no supervisor is running on {db_path} (its lock is free)")
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (ValueError, OSError):
        return None
