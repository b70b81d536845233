"""One SQLite connection (apsw) with cardq's pragmas, and the two ways to use it: `write` and `read`.

Guarantees:
- every connection runs in WAL mode with the configured `synchronous`, a busy timeout and foreign keys, and
  each pragma is read back after it is set (apsw runs a multi-statement string lazily: see FIELD_NOTES);
- every write transaction begins IMMEDIATE, so it takes the write lock up front and waits busy_timeout for it,
  instead of failing half-way when a deferred transaction tries to upgrade;
- SQLITE_BUSY that outlasts busy_timeout is retried with exponential backoff and full jitter, a bounded number of
  times, then surfaces as `StoreBusy` — never swallowed;
- a file that is not SQLite, or is SQLite but not cardq's, is refused before anything writes to it.

A connection must never cross a fork: open one in each process, after it starts.
"""

from __future__ import annotations

import os
import random
import time
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import apsw

from cardq.errors import StoreBusy, StoreError, StoreUnwritable, os_problem, read_only_fs
from cardq.store import schema, totals, usage

T = TypeVar("T")

_SYNC_LEVELS = {"normal": 1, "full": 2}
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0


class Tx:
    """A write transaction in progress, as code above store/ holds it: an opaque handle passed to store operations
    (store/counters.py, gates.py, traffic.py, ...) so that several of them commit together, as an actor's batch
    does. Savepoints let one message's changes roll back alone. Valid only inside the `Database.batch` call that
    made it."""

    __slots__ = ("c",)

    def __init__(self, c: apsw.Connection):
        self.c = c

    def savepoint(self) -> None:
        self.c.execute("SAVEPOINT msg")

    def release(self) -> None:
        self.c.execute("RELEASE msg")

    def rollback_to_savepoint(self) -> None:
        self.c.execute("ROLLBACK TO msg")
        self.c.execute("RELEASE msg")


class Database:
    """An open cardq database. Not thread-safe and not fork-safe: one per process (or per thread)."""

    def __init__(self, conn: apsw.Connection, path: Path, *, busy_retries: int, timezone: str,
                 rng: random.Random | None = None, max_kinds: int = totals.MAX_KINDS):
        self.conn = conn
        self.path = path
        self.busy_retries = busy_retries
        self.busy_timeout_ms = 5000  # set by open()
        self.tz = zoneinfo.ZoneInfo(timezone)
        self.days = usage.DayClock(self.tz)  # the local day (limits.timezone) of a time, cached per day
        self.kinds = totals.KindLabels(max_kinds)  # the name each job kind is counted under (store/totals.py)
        self._rng = rng or random.Random()

    @classmethod
    def open(cls, path: str | Path, *, synchronous: str = "normal", busy_timeout_ms: int = 5000,
             busy_retries: int = 6, timezone: str = "UTC", create: bool = False,
             autocheckpoint: bool = True, max_kinds: int = totals.MAX_KINDS) -> Database:
        """Open (with create=True: create) the database at `path` and bring its schema up to date.

        autocheckpoint=False leaves WAL checkpoints to someone else (the supervisor checkpoints on a timer for
        its workers): a commit then never pays for copying the WAL back into the database file. max_kinds: job
        kinds counted by name in the totals (store/totals.py); later ones count as "(other)".

        Refuses, without modifying the file: a missing file (unless create), a file that is not SQLite, a SQLite
        database that is not cardq's, and a cardq database written by a newer cardq.
        """
        path = Path(path)
        if not create and not path.exists():
            raise StoreError(f"{path}: no database here; run `cardq init` (or point --config at the right one)")
        if path.is_dir():
            raise StoreError(f"{path}: is a directory; expected a database file path")
        flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
        try:
            if create:
                # Job payloads are customers' data: the file is the owner's alone (0600; SQLite gives the -wal
                # and -shm files the database file's mode), a folder made for it 0700.
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            conn = apsw.Connection(str(path), flags=flags, statementcachesize=256)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the database: {os_problem(e, path)}") from None
        except apsw.CantOpenError:
            raise StoreError(f"{path}: cannot open the database: {_why_unopenable(path)}") from None
        db = cls(conn, path, busy_retries=busy_retries, timezone=timezone, max_kinds=max_kinds)
        try:
            conn.setbusytimeout(busy_timeout_ms)
            db.busy_timeout_ms = busy_timeout_ms
            # Plan each statement once: without this, the bundled SQLite (built with STAT4) re-plans statements
            # such as the claim whenever a bound value changes, ~15% of a claim.
            conn.config(apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 1)
            db._retry_busy(lambda: schema.check_identity(conn, path, allow_fresh=create), "open")
            db._set_pragmas(synchronous, busy_timeout_ms)
            if not autocheckpoint:
                conn.execute("PRAGMA wal_autocheckpoint=0").fetchall()
            db._retry_busy(lambda: schema.migrate(conn, path), "schema upgrade")
        except apsw.Error as e:
            conn.close()
            raise translate(e, path) from None
        except BaseException:
            conn.close()
            raise
        return db

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_pragmas(self, synchronous: str, busy_timeout_ms: int) -> None:
        """One pragma per call, each read back: a setting that did not take effect is an error, not a surprise."""
        c = self.conn
        mode = c.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: could not switch to WAL mode (journal_mode is {mode})")
        want = _SYNC_LEVELS[synchronous]
        c.execute(f"PRAGMA synchronous={want}").fetchall()
        c.execute("PRAGMA foreign_keys=ON").fetchall()
        # Bound the WAL file after checkpoints, so a burst does not leave a huge file behind forever.
        c.execute("PRAGMA journal_size_limit=67108864").fetchall()
        got = self.pragmas()
        expected = {"journal_mode": "wal", "synchronous": want, "foreign_keys": 1, "busy_timeout": busy_timeout_ms}
        for name, value in expected.items():
            if got[name] != value:
                raise StoreError(f"{self.path}: PRAGMA {name} is {got[name]!r} after setting it to {value!r}")

    def checkpoint(self, *, truncate_above: int | None = None, wait_ms: int = 100) -> int:
        """Copy what it can of the WAL into the database file without waiting on anyone (PASSIVE); then, if the
        WAL file is over `truncate_above` bytes, start it over (TRUNCATE), waiting at most `wait_ms` for the
        writers and readers in its way. Returns the WAL's size in bytes afterwards.

        Why both: under continuous writers a PASSIVE checkpoint never catches up with the log's end, so the log is
        never restarted and grows without bound (2.3 GiB in 8 s from two busy writers here). TRUNCATE makes new
        writers wait while it runs, so it is bounded by `wait_ms` (a reader holding an old snapshot makes it give
        up: it is tried again next time; the WAL may grow meanwhile and shrinks once that read ends).
        """
        c = self.conn
        try:
            c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except apsw.Error as e:  # (a full disk: the database file cannot grow to take the pages)
            raise translate(e, self.path) from None
        size = self.wal_bytes()
        if truncate_above is None or size <= truncate_above:
            return size
        c.setbusytimeout(wait_ms)
        try:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # busy = 1 when it had to give up
        except (apsw.BusyError, apsw.LockedError):
            pass  # someone held on past wait_ms: next time
        except apsw.Error as e:
            raise translate(e, self.path) from None
        finally:
            c.setbusytimeout(self.busy_timeout_ms)
        return self.wal_bytes()

    def wal_bytes(self) -> int:
        """The WAL file's size now (0 when there is none)."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    def pragmas(self) -> dict[str, object]:
        """The pragmas as SQLite reports them now (for tests and `cardq selftest`)."""
        c = self.conn
        return {
            name: c.execute(f"PRAGMA {name}").fetchall()[0][0]
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }

    def schema_version(self) -> int:
        return schema.current_version(self.conn)

    def change_token(self) -> int:
        """A number that changes whenever ANOTHER connection commits to the database (a cheap read of shared
        memory, no table touched). Compare two tokens to learn whether anything may have changed since; a
        different backend gives its own kind of token with the same meaning."""
        try:
            return self.conn.execute("PRAGMA data_version").fetchall()[0][0]
        except apsw.Error as e:
            raise translate(e, self.path) from None

    def batch(self, fn: Callable[[Tx], T], what: str = "batch") -> T:
        """Run fn(tx) in one write transaction (see `write`): for callers above store/ that combine several store
        operations into one commit."""
        return self.write(lambda c: fn(Tx(c)), what)

    def write(self, fn: Callable[[apsw.Connection], T], what: str = "write") -> T:
        """Run fn(conn) in one BEGIN IMMEDIATE transaction: all of it commits, or none of it.

        fn may run more than once (a retry after SQLITE_BUSY), so it must not have effects outside the database.
        """

        def attempt() -> T:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                out = fn(c)
                c.execute("COMMIT")
                return out
            except BaseException:
                if not c.getautocommit():
                    c.execute("ROLLBACK")
                raise

        return self._retry_busy(attempt, what)

    def read(self, fn: Callable[[apsw.Connection], T], what: str = "read") -> T:
        """Run fn(conn) in one read transaction: every query in it sees the same snapshot."""

        def attempt() -> T:
            c = self.conn
            c.execute("BEGIN")
            try:
                return fn(c)
            finally:
                if not c.getautocommit():
                    c.execute("COMMIT")

        return self._retry_busy(attempt, what)

    def _retry_busy(self, fn: Callable[[], T], what: str) -> T:
        started = time.monotonic()
        for attempt in range(1, self.busy_retries + 1):
            try:
                return fn()
            except (apsw.BusyError, apsw.LockedError):
                if attempt == self.busy_retries:
                    break
                # Full jitter: concurrent losers spread out instead of colliding again in lockstep.
                time.sleep(self._rng.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))))
            except apsw.Error as e:
                raise translate(e, self.path) from None
        waited = time.monotonic() - started
        raise StoreBusy(
            f"{self.path}: database is locked by another process: {what} gave up after "
            f"{self.busy_retries} attempts over {waited:.1f}s (max_retries_exceeded attempts={self.busy_retries})"
        )


def translate(e: apsw.Error, path: Path) -> StoreError:
    """apsw's exception → one line an operator can act on."""
    if isinstance(e, StoreError):
        return e
    if isinstance(e, apsw.NotADBError):
        return StoreError(f"{path}: not a SQLite database (refused, file left untouched)")
    if isinstance(e, apsw.FullError) or (isinstance(e, apsw.IOError) and disk_full(path)):
        # (SQLite reports some writes that ran out of space, the -shm file's growth say, as I/O errors.)
        return StoreUnwritable(f"{path}: disk full: the write was rolled back, nothing was changed; free space "
                               "on its file system (writers wait and retry until then)", "disk full")
    if isinstance(e, apsw.ReadOnlyError | apsw.IOError) and read_only_fs(path):
        return StoreUnwritable(f"{path}: the file system is read-only: the write was rolled back, nothing was "
                               "changed; remount it read-write (writers wait and retry until then)", "read-only")
    if isinstance(e, apsw.ReadOnlyError):
        return StoreError(f"{path}: database is read-only for this user; check file and folder permissions")
    if isinstance(e, apsw.CorruptError):
        return StoreError(f"{path}: database file is corrupt: {e}")
    if isinstance(e, apsw.CantOpenError):
        return StoreError(f"{path}: cannot open the database: {_why_unopenable(path)}")
    if isinstance(e, apsw.IOError | apsw.PermissionsError):
        return StoreError(f"{path}: cannot use database: {e}")
    if isinstance(e, apsw.BusyError | apsw.LockedError):
        return StoreBusy(f"{path}: database is locked by another process")
    return StoreError(f"{path}: database error: {type(e).__name__}: {e}")


DISK_FULL_BELOW = 64 * 1024  # bytes free: less than a few pages cannot take a commit


def disk_full(path: Path) -> bool:
    """Is the file system that holds the database out of space (for this user)?"""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BELOW


def _why_unopenable(path: Path) -> str:
    """SQLite says only "unable to open database file": find out why, in words an operator acts on. (Opening a
    WAL database writes beside it — the -wal and -shm files — so the folder must be writable too.)"""
    folder = path.parent
    if read_only_fs(path):
        return ("read-only file system: cardq writes its -wal and -shm files beside the database; remount it "
                "read-write, or move the database")
    if disk_full(path):
        return "disk full: no room for the -wal and -shm files beside it; free space on its file system"
    for target, need in ((path, os.R_OK | os.W_OK), (folder, os.W_OK | os.X_OK)):
        if target.exists() and not os.access(target, need):
            return (f"permission denied on {target} (cardq needs to read and write the database and create files "
                    "in its folder); check their owner and mode")
    return "SQLite could not open it (unable to open database file)"
