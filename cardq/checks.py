"""`cardq selftest` (the old /admin/selftest): each check prints ok or fail with its detail."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from cardq import app
from cardq.config import LoadedConfig
from cardq.errors import Error, read_only_fs
from cardq.lockfile import NotRunning, running_pid
from cardq.store import Database
from cardq.store.schema import SCHEMA_VERSION

MIN_FREE_BYTES = 100 * 1024 * 1024


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str


def run(config_path: str | None) -> list[Check]:
    return list(_checks(config_path))


def _checks(config_path: str | None) -> Iterator[Check]:
    try:
        loaded = app.load(config_path)
    except Error as e:
        yield Check("config", False, str(e))
        return
    yield Check("config", True, f"{loaded.source} ({loaded.digest})")
    db: Database | None = None
    try:
        db = app.open_db(loaded)
        yield Check("database", True, str(db.path))
        yield _check("pragmas", lambda: _pragmas(db, loaded))
        version = db.schema_version()
        yield Check("schema", version == SCHEMA_VERSION, f"v{version} (this cardq: v{SCHEMA_VERSION})")
    except Error as e:
        yield Check("database", False, str(e))
    finally:
        if db is not None:
            db.close()
    yield _check("handler", lambda: _handler(loaded.config.workers.handler))
    yield _check("disk", lambda: _disk(loaded))
    loose = loose_permissions(loaded)
    yield Check("permissions", not loose, "; ".join(loose) or "database, WAL, log and key file are the owner's only")
    yield _check("supervisor", lambda: f"pid {running_pid(loaded.db_path)}")


def loose_permissions(loaded: LoadedConfig) -> list[str]:
    """cardq's files that other local users can read or write (each as "path mode 644: expected 600")."""
    db = loaded.db_path
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), loaded.run_dir / "cardq.key"]
    if loaded.config.log.file:
        files.append(Path(loaded.config.log.file))  # as `cardq supervise` opens it
    out = []
    for path in files:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            continue  # not there (yet): nothing to expose
        if mode & 0o077:
            out.append(f"{path} mode {mode:o}: readable or writable by others, expected 600 (chmod 600 {path})")
    return out


def disk_warnings(loaded: LoadedConfig) -> list[str]:
    """The database's file system nearly or quite full, or mounted read-only (each as one line)."""
    folder = loaded.db_path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return []
    out = []
    if read_only_fs(folder):
        out.append(f"{folder}: the file system is read-only: nothing can be stored; workers wait for it to be "
                   "remounted read-write")
    elif free < MIN_FREE_BYTES:
        state = "disk full" if free < 1024 * 1024 else "disk nearly full"
        out.append(f"{folder}: {state}: {free // 1024} KiB free (at least {MIN_FREE_BYTES // 2**20} MiB expected); "
                   "writes that need room fail, workers wait and carry on by themselves once space is freed")
    return out


def _handler(spec: str) -> str:
    from cardq.handlers import HandlerCheck  # (here: `cardq status` imports this module for its warnings alone)

    HandlerCheck(spec).wait()  # in a child: importing runs the module, which may hang or exit
    return spec


def _check(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except (Error, NotRunning, OSError) as e:
        return Check(name, False, str(e))


def _pragmas(db: Database, loaded: LoadedConfig) -> str:
    got = db.pragmas()
    want = {"journal_mode": "wal", "synchronous": {"normal": 1, "full": 2}[loaded.config.store.synchronous],
            "foreign_keys": 1, "busy_timeout": loaded.config.store.busy_timeout_ms}
    bad = {k: v for k, v in got.items() if want[k] != v}
    if bad:
        raise Error(f"not in effect: {bad} (expected {want})")
    return ", ".join(f"{k}={v}" for k, v in got.items())


def _disk(loaded: LoadedConfig) -> str:
    free = shutil.disk_usage(loaded.db_path.parent).free
    if free < MIN_FREE_BYTES:
        raise Error(f"{free // 2**20} MiB free under {loaded.db_path.parent}; expected at least "
                         f"{MIN_FREE_BYTES // 2**20} MiB")
    return f"{free // 2**20} MiB free"
