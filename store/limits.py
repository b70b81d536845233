"""Limits (the old `limits_config` table): effective value = database override > config.toml > built-in default.

Overrides are read inside each submit's own transaction, so a `cardq limits set` applies to the very next submit:
no restart, no cache to wait out (the old system cached limits in each worker for 5 minutes).
"""

from __future__ import annotations

from collections.abc import Mapping

import apsw
import msgspec

from cardq.errors import InputError
from cardq.store.db import Database

DAILY_PREFIX = "daily."
MAXIMUM = 10**12  # far above any sane limit, far below SQLite's 64-bit integers
_MINIMUM = {"max_payload_bytes": 2}  # everything else: >= 1, daily plan limits >= 0


class Limit(msgspec.Struct, frozen=True):
    key: str
    value: int
    source: str  # "override" (database), "config" (config.toml) or "default" (built-in)
    configured: int  # the value config.toml (or the built-in default) gives, which `unset` returns to


def minimum(key: str) -> int:
    return 0 if key.startswith(DAILY_PREFIX) else _MINIMUM.get(key, 1)


def effective(conn: apsw.Connection, configured: Mapping[str, tuple[int, str]]) -> dict[str, Limit]:
    """Every known limit with its value in effect now and where that value comes from.

    `configured` maps each key to (value, "config" | "default") as the loaded config gives it; overrides for keys
    the config no longer knows (a removed plan) are ignored.
    """
    overrides = dict(conn.execute("SELECT key, value FROM limits").fetchall())
    out = {}
    for key, (value, source) in configured.items():
        if key in overrides:
            out[key] = Limit(key, overrides[key], "override", value)
        else:
            out[key] = Limit(key, value, source, value)
    return out


def values(conn: apsw.Connection, configured: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    """Just the effective numbers (what a submit checks against); `effective` says where each comes from."""
    out = {key: value for key, (value, _source) in configured.items()}
    for key, value in conn.execute("SELECT key, value FROM limits"):
        if key in out:
            out[key] = value
    return out


def validate(configured: Mapping[str, tuple[int, str]], key: str, value: str | int) -> int:
    """Check an operator's KEY VALUE; returns the value as int or raises InputError naming what is expected."""
    check_key(configured, key)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"limit {key} = {value!r}: expected a whole number") from None
    if not minimum(key) <= number <= MAXIMUM:
        raise InputError(f"limit {key} = {number}: expected a whole number from {minimum(key)} to {MAXIMUM}")
    return number


def check_key(configured: Mapping[str, tuple[int, str]], key: str) -> None:
    """InputError naming the known keys (and the plans) unless `key` is a limit."""
    if key not in configured:
        plans = [k[len(DAILY_PREFIX):] for k in configured if k.startswith(DAILY_PREFIX)]
        hint = ""
        if key.startswith(DAILY_PREFIX):
            hint = f" (plans come from config.toml [limits.daily]: {', '.join(plans)})"
        raise InputError(f"unknown limit {key!r}; expected one of: {', '.join(configured)}{hint}")


def set_override(conn: apsw.Connection, key: str, value: int, now: float) -> None:
    """Store an override (validated by `validate` first). Atomic: one upsert."""
    conn.execute(
        "INSERT INTO limits (key, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (key, value, now),
    )


def unset_override(conn: apsw.Connection, key: str) -> bool:
    """Drop an override; returns whether there was one."""
    conn.execute("DELETE FROM limits WHERE key = ?", (key,))
    return conn.changes() > 0


# ---- the same, each in a transaction of its own (for callers above store/) --------------------------------------


def show(db: Database, configured: Mapping[str, tuple[int, str]]) -> dict[str, Limit]:
    """`effective`, read from one snapshot."""
    return db.read(lambda c: effective(c, configured), "limits")


def in_effect(db: Database, configured: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    """`values`, read from one snapshot."""
    return db.read(lambda c: values(c, configured), "limits")


def override(db: Database, configured: Mapping[str, tuple[int, str]], key: str, value: str | int,
             *, now: float) -> int:
    """Validate and store an override; returns the value stored. The next submit applies it."""
    number = validate(configured, key, value)
    db.write(lambda c: set_override(c, key, number, now), "limits set")
    return number


def drop_override(db: Database, configured: Mapping[str, tuple[int, str]], key: str) -> bool:
    """Back to the config.toml (or built-in) value; returns whether there was an override."""
    check_key(configured, key)
    return db.write(lambda c: unset_override(c, key), "limits unset")
