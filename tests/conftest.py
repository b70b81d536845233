"""Shared fixtures: every test gets its own temp folder and real SQLite file; every connection opened through
these fixtures is closed at teardown."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cardq.config import LoadedConfig, load_config
from cardq.store import Database


def wait_for(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> object:
    """Poll cond() until it returns something truthy, or fail after `timeout` seconds. Never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cardq.db"


@pytest.fixture
def open_db(db_path: Path) -> Iterator[Callable[..., Database]]:
    """A factory: open_db(**kw) opens (creating) the test database; all are closed at teardown."""
    opened: list[Database] = []

    def factory(**kw) -> Database:
        kw.setdefault("create", True)
        db = Database.open(kw.pop("path", db_path), **kw)
        opened.append(db)
        return db

    yield factory
    for db in opened:
        db.close()


@pytest.fixture
def db(open_db) -> Database:
    return open_db()


@pytest.fixture
def loaded() -> LoadedConfig:
    """The built-in default config (limits: 200 per batch, 300 queued per user, free 5/day, ...)."""
    return load_config(None)


@pytest.fixture
def configured(loaded: LoadedConfig) -> dict[str, tuple[int, str]]:
    return loaded.limit_values()


@pytest.fixture
def unlimited(configured) -> dict[str, tuple[int, str]]:
    """Limits so high that only the test's own logic decides."""
    return {k: (10**9, "config") for k in configured}


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], Path]:
    """config_file(extra_toml) writes tmp_path/config.toml (database next to it) and returns its path."""

    def write(extra: str = "") -> Path:
        path = tmp_path / "config.toml"
        path.write_text(extra)
        return path

    return write
