"""The connection: pragmas really in effect, identity checks that never modify a foreign file, schema versions,
and SQLITE_BUSY surfacing as StoreBusy after bounded retries."""

from __future__ import annotations

import sqlite3

import apsw
import pytest

from cardq.store import Database, StoreBusy, StoreError
from cardq.store.schema import APPLICATION_ID, SCHEMA_VERSION


@pytest.mark.parametrize("sync, level", [("normal", 1), ("full", 2)])
def test_every_pragma_is_in_effect(open_db, sync, level):
    db = open_db(synchronous=sync, busy_timeout_ms=1234)
    assert db.pragmas() == {"journal_mode": "wal", "synchronous": level, "foreign_keys": 1, "busy_timeout": 1234}
    # Read back from a second, independent connection: WAL is a property of the file.
    other = apsw.Connection(str(db.path))
    assert other.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    other.close()


def test_new_database_is_marked_and_versioned(db):
    c = db.conn
    assert c.execute("PRAGMA application_id").fetchall()[0][0] == APPLICATION_ID
    assert c.execute("PRAGMA user_version").fetchall()[0][0] == SCHEMA_VERSION
    versions = [r[0] for r in c.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_missing_database_is_refused_without_create(db_path):
    with pytest.raises(StoreError, match="cardq init"):
        Database.open(db_path)
    assert not db_path.exists()


def test_reopen_keeps_data_and_does_not_migrate_again(open_db, db_path):
    db = open_db()
    db.write(lambda c: c.execute("INSERT INTO limits VALUES ('x', 1, 0)"))
    db.close()
    again = open_db(create=False)
    assert again.conn.execute("SELECT value FROM limits WHERE key = 'x'").fetchall() == [(1,)]
    assert again.conn.execute("SELECT count(*) FROM schema_migrations").fetchall()[0][0] == SCHEMA_VERSION


def test_text_file_is_refused_and_untouched(db_path):
    db_path.write_bytes(b"not a database, just some words\n" * 100)
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="not a SQLite database"):
        Database.open(db_path, create=True)
    assert db_path.read_bytes() == before


def test_foreign_sqlite_database_is_refused_and_untouched(db_path):
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE customers (id INTEGER)")
    other.commit()
    other.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="not a cardq one"):
        Database.open(db_path, create=True)
    assert db_path.read_bytes() == before
    assert not db_path.with_name(db_path.name + "-wal").exists()  # was never switched to WAL


def test_database_from_a_newer_cardq_is_refused(open_db, db_path):
    db = open_db()
    db.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}").fetchall()
    db.close()
    with pytest.raises(StoreError, match=f"schema v{SCHEMA_VERSION + 1} was written by a newer cardq"):
        Database.open(db_path)


def test_empty_file_needs_init(db_path):
    db_path.touch()
    with pytest.raises(StoreError, match="empty database"):
        Database.open(db_path)


def test_locked_database_gives_store_busy_after_bounded_retries(open_db, db_path):
    db = open_db(busy_timeout_ms=20, busy_retries=3)
    locker = apsw.Connection(str(db_path))
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreBusy, match=r"locked by another process: submit gave up after 3 attempts"):
            db.write(lambda c: c.execute("INSERT INTO limits VALUES ('x', 1, 0)"), "submit")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # Once the lock is gone the same call goes through: nothing stuck half-way.
    db.write(lambda c: c.execute("INSERT INTO limits VALUES ('x', 1, 0)"))
    assert db.conn.execute("SELECT count(*) FROM limits").fetchall()[0][0] == 1


def test_write_rolls_back_whole_transaction_on_error(db):
    def tx(c):
        c.execute("INSERT INTO limits VALUES ('a', 1, 0)")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        db.write(tx)
    assert db.conn.execute("SELECT count(*) FROM limits").fetchall()[0][0] == 0
    assert db.conn.getautocommit()  # no transaction left open


def test_write_transactions_begin_immediate(db, db_path):
    """A write transaction holds the write lock from its first statement: another writer cannot slip in."""
    other = Database.open(db_path, busy_timeout_ms=0, busy_retries=1)
    try:
        def tx(c):
            with pytest.raises(StoreBusy):
                other.write(lambda c2: None)
            return True

        assert db.write(tx)
    finally:
        other.close()
