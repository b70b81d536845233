"""The Counter actor: named integer counters, exactly once.

incr(key, n, op_id), get(key), incr_if_below(key, n, limit, op_id) -> {ok, value}. An op_id already applied
gets the answer it got the first time and changes nothing (op ids are kept a day). State lives in SQLite only
(no cache), so the job store can move the same rows in its own transactions.

Keys `usage:<user>` are the job store's per-user daily usage (jobs done today in limits.timezone): the one number
`cardq submit`, the workers and apps read and move. incr_if_below on them counts the user's queued and processing
jobs too, exactly like the submit check (done today + active + n <= limit).
"""

from __future__ import annotations

import time
from typing import Any

import apsw
import msgspec

from actors.protocol import ActorError
from actors.server import SINGLE, Behaviour, Client

OP_RETENTION_S = 86400
USAGE = "usage:"


class Incr(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    op_id: str
    n: int = 1


class Get(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class IncrIfBelow(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    n: int
    limit: int
    op_id: str


class Counter(Behaviour):
    name = "counter"
    ops = {"incr": (Incr, "incr"), "get": (Get, "get", SINGLE), "incr_if_below": (IncrIfBelow, "incr_if_below")}

    def incr(self, c: apsw.Connection, client: Client, a: Incr, msg_id: int | None) -> int:
        seen = self._seen(c, a.op_id)
        if seen is not None:
            return seen[1]
        value = self._read(c, a.key) + a.n
        self._write(c, a.key, value, a.n)
        self._remember(c, a.op_id, True, value)
        return value

    def get(self, c: apsw.Connection, client: Client, a: Get, msg_id: int | None) -> int:
        return self._read(c, a.key)

    def incr_if_below(self, c: apsw.Connection, client: Client, a: IncrIfBelow, msg_id: int | None) -> dict[str, Any]:
        seen = self._seen(c, a.op_id)
        if seen is not None:
            return {"ok": bool(seen[0]), "value": seen[1]}
        value = self._read(c, a.key)
        counted = value + self._active(c, a.key)
        ok = counted + a.n <= a.limit
        if ok:
            value += a.n
            self._write(c, a.key, value, a.n)
        self._remember(c, a.op_id, ok, value)
        return {"ok": ok, "value": value}

    def tick(self, c: apsw.Connection, now: float) -> list:
        c.execute("DELETE FROM counter_ops WHERE at < ?", (now - OP_RETENTION_S,))
        return []

    def next_tick(self, now: float) -> float:
        return now + 60.0

    # ---- storage --------------------------------------------------------------------------------------------

    def _seen(self, c: apsw.Connection, op_id: str) -> tuple[int, int] | None:
        rows = c.execute("SELECT ok, value FROM counter_ops WHERE op_id = ?", (op_id,)).fetchall()
        return rows[0] if rows else None

    def _remember(self, c: apsw.Connection, op_id: str, ok: bool, value: int) -> None:
        c.execute("INSERT INTO counter_ops (op_id, ok, value, at) VALUES (?, ?, ?, ?)",
                  (op_id, int(ok), value, time.time()))

    def _read(self, c: apsw.Connection, key: str) -> int:
        if key.startswith(USAGE):
            day = self.db.days.key(time.time())
            rows = c.execute("SELECT CASE WHEN done_day = ? THEN done_today ELSE 0 END FROM user_load"
                             " WHERE user_id = ?", (day, key[len(USAGE):])).fetchall()
        else:
            rows = c.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchall()
        return rows[0][0] if rows else 0

    def _active(self, c: apsw.Connection, key: str) -> int:
        if not key.startswith(USAGE):
            return 0
        rows = c.execute("SELECT active FROM user_load WHERE user_id = ?", (key[len(USAGE):],)).fetchall()
        return rows[0][0] if rows else 0

    def _write(self, c: apsw.Connection, key: str, value: int, n: int) -> None:
        if value < 0 and key.startswith(USAGE):
            raise ActorError(f"{key}: usage cannot go below 0", "bad_request")
        if key.startswith(USAGE):
            day = self.db.days.key(time.time())
            c.execute(
                "INSERT INTO user_load (user_id, done_day, done_today) VALUES (?1, ?2, ?3)"
                " ON CONFLICT (user_id) DO UPDATE SET done_today = ?3, done_day = ?2",
                (key[len(USAGE):], day, value))
        else:
            c.execute("INSERT INTO counters (key, value, updated_at) VALUES (?, ?, ?)"
                      " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                      (key, value, time.time()))
