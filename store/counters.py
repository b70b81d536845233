"""Named integer counters (the Counter actor's state), exactly once per op id.

Each operation runs inside the caller's transaction (a `Tx`: the actor's batch). An op id already applied gets
the answer it got the first time and changes nothing; op ids are kept until `prune_ops` drops them (a day).

A key `usage:<user>` is not a row of `counters`: it IS the user's daily usage in the job store (user_load,
owned by store/usage.py), so a counter read or move and a submit check see one number.

A key `tokens:<user>:<day>` counts the upstream tokens of the user's jobs done that day (limits.timezone): the
job store adds a job's `_meta.usage.total_tokens` in the transaction that marks it done (add_in), so a job
retried after a lost lease or a crash is counted once, when it is done.
"""

from __future__ import annotations

import apsw

from cardq.errors import InputError
from cardq.store import usage
from cardq.store.db import Tx

USAGE = "usage:"
TOKENS = "tokens:"

COUNTER_MAX = 2**63 - 1


def tokens_key(user: str, day: str) -> str:
    return f"{TOKENS}{user}:{day}"


def add_in(c: apsw.Connection, amounts: dict[str, int], now: float) -> None:
    """Add each amount to its counter, inside the caller's transaction (the job store's completion)."""
    c.executemany("INSERT INTO counters (key, value, updated_at) VALUES (?, ?, ?)"
                  " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value, updated_at = excluded.updated_at",
                  [(key, n, now) for key, n in amounts.items()])


def get(tx: Tx, key: str, *, day: str) -> int:
    """The counter's value (0 if it was never set). `day` is today in limits.timezone (for usage: keys)."""
    if key.startswith(USAGE):
        return usage.load(tx.c, key[len(USAGE):], day).done_today
    rows = tx.c.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchall()
    return rows[0][0] if rows else 0


def incr(tx: Tx, key: str, n: int, op_id: str, *, day: str, now: float) -> int:
    """Add n (may be negative) once per op_id; the value after it. An op id already used for a different
    request (another key or amount) is refused with InputError."""
    request = f"incr {key} {n}"
    seen = _seen(tx, op_id, request)
    if seen is not None:
        return seen[1]
    value = get(tx, key, day=day) + n
    if not -COUNTER_MAX <= value <= COUNTER_MAX:  # SQLite's INTEGER is 64-bit: refuse, never fail the batch
        raise InputError(f"counter {key!r}: adding {n} would take it past ±{COUNTER_MAX} (a 64-bit integer)")
    _set(tx, key, value, day, now)
    _remember(tx, op_id, request, True, value, now)
    return value


def incr_if_below(tx: Tx, key: str, n: int, limit: int, op_id: str, *, day: str, now: float) -> tuple[bool, int]:
    """Add n only if the counted total stays <= limit, once per op_id: (added, the value after).

    For usage:<user> the counted total includes the user's queued and processing jobs, exactly like the submit
    check (done today + active + n <= limit)."""
    request = f"incr_if_below {key} {n} {limit}"
    seen = _seen(tx, op_id, request)
    if seen is not None:
        return bool(seen[0]), seen[1]
    if key.startswith(USAGE):
        load = usage.load(tx.c, key[len(USAGE):], day)
        value, counted = load.done_today, load.done_today + load.active
    else:
        value = counted = get(tx, key, day=day)
    ok = counted + n <= limit
    if ok:
        value += n
        _set(tx, key, value, day, now)
    _remember(tx, op_id, request, ok, value, now)
    return ok, value


def prune_ops(tx: Tx, before: float) -> None:
    """Forget op ids applied before `before` (a resend later than that would be applied again)."""
    tx.c.execute("DELETE FROM counter_ops WHERE at < ?", (before,))


def _seen(tx: Tx, op_id: str, request: str) -> tuple[int, int] | None:
    """The answer an op id got, if it was applied; InputError if it was applied to a different request."""
    rows = tx.c.execute("SELECT ok, value, request FROM counter_ops WHERE op_id = ?", (op_id,)).fetchall()
    if not rows:
        return None
    ok, value, first = rows[0]
    if first and first != request:
        reason = f"op id {op_id!r} was used for `{first}`; this is `{request}`: expected a new op id"
        raise InputError(reason, where="op_id", reason=reason)
    return ok, value


def _remember(tx: Tx, op_id: str, request: str, ok: bool, value: int, now: float) -> None:
    tx.c.execute("INSERT INTO counter_ops (op_id, ok, value, at, request) VALUES (?, ?, ?, ?, ?)",
                 (op_id, int(ok), value, now, request))


def _set(tx: Tx, key: str, value: int, day: str, now: float) -> None:
    if key.startswith(USAGE):
        if value < 0:
            raise InputError(f"{key}: usage cannot go below 0", where=key, reason="usage cannot go below 0")
        usage.set_done_today(tx.c, key[len(USAGE):], day, value)
    else:
        tx.c.execute("INSERT INTO counters (key, value, updated_at) VALUES (?, ?, ?)"
                     " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                     (key, value, now))
