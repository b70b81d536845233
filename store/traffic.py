"""Traffic events and hourly path statistics (the PathCollector actor's), and the inbox for events that could
not reach a collector.

- `traffic_events`: one row per event id ("<ts_ms>-<8 hex>"), inserted idempotently; ids start with the
  13-digit ts_ms, so id order is time order.
- `path_stats_hourly`: one row per (hour, path): counts, response-time figures and two mergeable sketches kept as
  opaque bytes (the collector decides what they are).
- `traffic_inbox`: events waiting for the collector shard that owns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import orjson

from cardq.store.db import Database, Tx


class HourStats(NamedTuple):
    requests: float
    status_4xx: float
    status_5xx: float
    bytes: float
    ms_sum: float
    ms_min: float
    ms_max: float
    latency: bytes  # a serialized quantile sketch
    clients: bytes  # a serialized distinct-count sketch
    estimated: bool  # counts scaled up from a sample


class HourRow(NamedTuple):
    hour: int  # epoch seconds of the hour's start (UTC)
    path: str
    stats: HourStats


EventRow = tuple[str, int, str, str, int, float, str, int | None]  # id, ts_ms, path, method, status, ms, client, bytes


def insert_events(tx: Tx, events: Sequence[EventRow]) -> list[str]:
    """Insert the events whose id is new, in one statement; returns exactly the ids inserted (a duplicate, from
    a resend or a second recorder, is not)."""
    if not events:
        return []
    return [row[0] for row in tx.c.execute(_INSERT, (orjson.dumps(events).decode(),))]


_INSERT = (
    "INSERT INTO traffic_events (id, ts_ms, path, method, status, response_ms, client, bytes)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7"
    " FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING RETURNING id"
)


def hour_paths(tx: Tx, hour: int) -> set[str]:
    """The paths that have a row for this hour."""
    return {p for (p,) in tx.c.execute("SELECT path FROM path_stats_hourly WHERE hour = ?", (hour,))}


def load_hour(tx: Tx, hour: int, path: str) -> HourStats | None:
    """One (hour, path) row's figures, or None if it has none yet."""
    rows = tx.c.execute(f"SELECT {_STATS} FROM path_stats_hourly WHERE hour = ? AND path = ?", (hour, path)).fetchall()
    return _stats(rows[0]) if rows else None


def save_hour(tx: Tx, hour: int, path: str, s: HourStats) -> None:
    """Write one (hour, path) row's figures whole (one upsert)."""
    tx.c.execute(
        f"INSERT INTO path_stats_hourly (hour, path, {_STATS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (hour, path) DO UPDATE SET requests = excluded.requests, status_4xx = excluded.status_4xx,"
        " status_5xx = excluded.status_5xx, bytes = excluded.bytes, ms_sum = excluded.ms_sum,"
        " ms_min = excluded.ms_min, ms_max = excluded.ms_max, latency = excluded.latency,"
        " clients = excluded.clients, estimated = excluded.estimated",
        (hour, path, *s[:9], int(s.estimated)))


_STATS = "requests, status_4xx, status_5xx, bytes, ms_sum, ms_min, ms_max, latency, clients, estimated"


def _stats(r: Sequence) -> HourStats:
    return HourStats(*r[:9], bool(r[9]))


def hourly(db: Database, *, hour: int | None = None, path: str | None = None, since: int | None = None,
           limit: int = 100) -> list[HourRow]:
    """path_stats_hourly rows, hottest first, optionally for one hour (or the hours from `since` on) and/or
    one path."""
    where, args = [], []
    if hour is not None:
        where.append("hour = ?")
        args.append(hour)
    if since is not None:
        where.append("hour >= ?")
        args.append(since)
    if path is not None:
        where.append("path = ?")
        args.append(path)
    sql = f"SELECT hour, path, {_STATS} FROM path_stats_hourly"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY requests DESC LIMIT ?"
    args.append(limit)
    return db.read(lambda c: [HourRow(r[0], r[1], _stats(r[2:])) for r in c.execute(sql, args)], "path stats")


def prune_events(tx: Tx, before_ms: int, limit: int) -> int:
    """Delete up to `limit` event rows older than before_ms (the hourly rows stay); returns how many."""
    # ids start with the 13-digit ts_ms, so the primary key finds them in time order.
    tx.c.execute("DELETE FROM traffic_events WHERE id IN (SELECT id FROM traffic_events WHERE id < ? LIMIT ?)",
                 (f"{before_ms:013d}-", limit))
    return tx.c.changes()


def inbox_add(db: Database, events: Sequence[tuple[int, str]]) -> None:
    """Park (collector shard, event JSON) pairs for the collector, in one transaction."""
    db.write(lambda c: c.executemany("INSERT INTO traffic_inbox (shard, event) VALUES (?, ?)", events),
             "traffic inbox")


def inbox_take(tx: Tx, shard: int, limit: int) -> list[tuple[int, str]]:
    """The oldest (row id, event JSON) pairs waiting for `shard`, up to `limit`; `inbox_delete` them once used."""
    return tx.c.execute("SELECT id, event FROM traffic_inbox WHERE shard = ? ORDER BY id LIMIT ?",
                        (shard, limit)).fetchall()


def inbox_delete(tx: Tx, row_ids: Sequence[int]) -> None:
    """Remove inbox rows once their events were ingested (in the same transaction)."""
    tx.c.executemany("DELETE FROM traffic_inbox WHERE id = ?", [(i,) for i in row_ids])
