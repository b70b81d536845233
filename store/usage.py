"""Per-user counters (table user_load) and daily figures.

`active` counts a user's jobs that are queued, scheduled or processing; every function that moves a job into or
out of those states adjusts it in the same transaction (the property tests check it always equals a count of
the rows). `done_today` counts jobs done on `done_day`, the calendar day in limits.timezone of the moment they
finished, so the daily plan limits start again at local midnight.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import apsw

if TYPE_CHECKING:
    from cardq.store.db import Database


class UserLoad(NamedTuple):
    active: int
    last_vt: int
    done_today: int


def day_key(now: float, tz: zoneinfo.ZoneInfo) -> str:
    """The local calendar day of epoch time `now`, as YYYY-MM-DD. (Floored to the second: a day starts on a whole
    second, and fromtimestamp would round 0.9999998 s before midnight up into the next day.)"""
    return dt.datetime.fromtimestamp(math.floor(now), tz).date().isoformat()


class DayClock:
    """day_key with the current day's bounds cached: a claim or completion asks for it on every call, and a
    time-zone conversion costs more than the rest of the Python around a claim."""

    def __init__(self, tz: zoneinfo.ZoneInfo):
        self.tz = tz
        self._start = self._end = 0.0
        self._key = ""

    def key(self, now: float) -> str:
        if not self._start <= now < self._end:
            self._key = day_key(now, self.tz)
            self._end = next_day_start(now, self.tz)
            local = dt.datetime.fromtimestamp(math.floor(now), self.tz)
            self._start = dt.datetime.combine(local.date(), dt.time(), tzinfo=self.tz).timestamp()
        return self._key


def next_day_start(now: float, tz: zoneinfo.ZoneInfo) -> float:
    """Epoch time of the next local midnight after `now` (when the daily limits start again)."""
    local = dt.datetime.fromtimestamp(math.floor(now), tz)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), tzinfo=tz)
    return midnight.timestamp()


def load(conn: apsw.Connection, user_id: str, day: str) -> UserLoad:
    rows = conn.execute(
        "SELECT active, last_vt, CASE WHEN done_day = ? THEN done_today ELSE 0 END FROM user_load"
        " WHERE user_id = ?",
        (day, user_id),
    ).fetchall()
    return UserLoad(*rows[0]) if rows else UserLoad(0, 0, 0)


def add_active(conn: apsw.Connection, deltas: Mapping[str, int]) -> None:
    """Add each delta (may be negative) to the user's active count."""
    # Two statements: SQLite checks `active >= 0` on an upsert's candidate row before resolving the conflict.
    conn.executemany(
        "INSERT INTO user_load (user_id, active) VALUES (?1, ?2)"
        " ON CONFLICT (user_id) DO UPDATE SET active = active + ?2",
        [(user, n) for user, n in deltas.items() if n > 0],
    )
    conn.executemany(
        "UPDATE user_load SET active = active + ?2 WHERE user_id = ?1",
        [(user, n) for user, n in deltas.items() if n < 0],
    )


def add_jobs(conn: apsw.Connection, user_id: str, n: int, last_vt: int) -> None:
    """n new active jobs for the user, the last of them at virtual time last_vt: one upsert."""
    conn.execute(
        "INSERT INTO user_load (user_id, active, last_vt) VALUES (?1, ?2, ?3)"
        " ON CONFLICT (user_id) DO UPDATE SET active = active + ?2, last_vt = ?3",
        (user_id, n, last_vt),
    )


def record_done(conn: apsw.Connection, done_by_user: Mapping[str, int], day: str) -> None:
    """Jobs left processing for done: each user's active count goes down and done_today up, on one row."""
    conn.executemany(
        "UPDATE user_load SET active = active - ?1,"
        " done_today = CASE WHEN done_day = ?2 THEN done_today + ?1 ELSE ?1 END, done_day = ?2"
        " WHERE user_id = ?3",
        [(n, day, user) for user, n in done_by_user.items()],
    )


def record_failure(conn: apsw.Connection, day: str, *, dead: bool) -> None:
    """Count one failed attempt (and, if it ended the job, one dead job) for `day`, for `cardq status`."""
    conn.execute(
        "INSERT INTO daily_stats (day, failed, dead) VALUES (?, 1, ?) "
        "ON CONFLICT (day) DO UPDATE SET failed = failed + 1, dead = dead + excluded.dead",
        (day, int(dead)),
    )


def set_done_today(conn: apsw.Connection, user_id: str, day: str, value: int) -> None:
    """Set the user's jobs done on `day` (the Counter's usage:<user>, moved by an app or an operator)."""
    conn.execute(
        "INSERT INTO user_load (user_id, done_day, done_today) VALUES (?1, ?2, ?3)"
        " ON CONFLICT (user_id) DO UPDATE SET done_today = ?3, done_day = ?2",
        (user_id, day, value),
    )


def pending_total(db: Database) -> int:
    """Jobs queued, scheduled or processing, over all users (what a burst run waits for)."""
    return db.read(lambda c: c.execute("SELECT coalesce(sum(active), 0) FROM user_load").fetchall()[0][0],
                   "pending jobs")
