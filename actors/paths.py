"""The PathCollector actor: traffic events in, idempotent detail rows and hourly aggregates out.

record(events) in one transaction (with the rest of its batch): each event is inserted into traffic_events
unless its id is there already, and ONLY the newly inserted ones are folded into path_stats_hourly (path, hour):
requests, 4xx, 5xx, bytes, sum/min/max response time, a KLL quantile sketch (p50/p95/p99; Apache DataSketches,
mergeable across hours and shards) and an HLL sketch of client hashes (exact while small). Duplicates and
redelivery never double count; the answer is given only after the commit, so a client that got no answer sends
the batch again and nothing is lost or counted twice.

Memory and table size stay bounded under hostile traffic: paths are normalized by the client, and each hour
keeps at most max_paths_per_hour distinct paths (later ones count as "(other)"). With sampling_rate < 1, an
event is kept when its id's hash falls under the rate (the same decision everywhere), counts are scaled by
1/rate and the row is marked estimated.

Events that could not reach the collector wait in traffic_inbox; the shard that owns them drains it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import apsw
import datasketches as ds
import msgspec
import orjson

from actors.server import Behaviour, Client
from actors.traffic import ID_RE, MAX_PATH, OTHER
from cardq.config import LoadedConfig

KLL_K = 200  # normalized rank error ~1.65%
HLL_LG_K = 14  # relative standard error ~0.8% once in HLL mode; exact-ish (coupon list/set) below ~2k
HOURS_IN_MEMORY = 2
INBOX_BATCH = 2000


class Event(msgspec.Struct):
    id: str
    ts_ms: int
    path: str
    status: int
    response_ms: float
    client: str
    method: str = "GET"
    bytes: int | None = None


class Record(msgspec.Struct, forbid_unknown_fields=True):
    events: list[Event]


@dataclass
class Agg:
    requests: float = 0.0
    s4xx: float = 0.0
    s5xx: float = 0.0
    bytes: float = 0.0
    ms_sum: float = 0.0
    ms_min: float = float("inf")
    ms_max: float = 0.0
    latency: Any = field(default_factory=lambda: ds.kll_floats_sketch(KLL_K))
    clients: Any = field(default_factory=lambda: ds.hll_sketch(HLL_LG_K, ds.tgt_hll_type.HLL_8))
    estimated: bool = False


class PathCollector(Behaviour):
    name = "paths"
    ops = {"record": (Record, "record")}

    def __init__(self, loaded: LoadedConfig, db: Any, shard: int):
        super().__init__(loaded, db, shard)
        self.cache: dict[tuple[int, str], Agg] = {}
        self.dirty: set[tuple[int, str]] = set()  # folded into since the transaction began
        self.paths_by_hour: dict[int, set[str]] = {}
        self.next_prune = 0.0
        shards = loaded.config.actors.paths_shards
        # Each shard folds its overflow into its own row: two shards updating one "(other)" row would
        # overwrite each other's counts.
        self.other = OTHER if shards <= 1 else f"{OTHER}#{shard}"
        self.apply_config(loaded)

    def apply_config(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        p = loaded.config.paths
        self.rate, self.max_paths = p.sampling_rate, p.max_paths_per_hour

    # ---- record ---------------------------------------------------------------------------------------------

    def record(self, c: apsw.Connection, client: Client, a: Record, msg_id: int | None) -> dict[str, Any]:
        return self.ingest(c, a.events)

    def ingest(self, c: apsw.Connection, events: list[Event]) -> dict[str, Any]:
        """Insert the new events in one statement, then fold exactly the ones it reports as inserted into the
        in-memory aggregates (pure Python that cannot fail on a validated event, so a failed insert leaves them
        untouched); before_commit writes the touched aggregates once per transaction."""
        rejected: list[list[Any]] = []
        keep: dict[str, Event] = {}
        sampled_out = 0
        for i, e in enumerate(events):
            problem = _check(e)
            if problem:
                rejected.append([i, problem])
            elif self.rate < 1.0 and int(e.id[-8:], 16) / 2**32 >= self.rate:
                sampled_out += 1
            else:
                keep.setdefault(e.id, e)
        inserted = [row[0] for row in c.execute(_INSERT, (orjson.dumps(
            [[e.id, e.ts_ms, e.path, e.method, e.status, e.response_ms, e.client, e.bytes] for e in keep.values()]
        ).decode(),))] if keep else []
        scale = 1.0 / self.rate
        for event_id in inserted:
            e = keep[event_id]
            hour = e.ts_ms // 3_600_000 * 3600
            key = (hour, self._capped(c, hour, e.path))
            agg = self._agg(c, key)
            agg.requests += scale
            agg.s4xx += scale if 400 <= e.status < 500 else 0.0
            agg.s5xx += scale if e.status >= 500 else 0.0
            agg.bytes += scale * (e.bytes or 0)
            agg.ms_sum += scale * e.response_ms
            agg.ms_min = min(agg.ms_min, e.response_ms)
            agg.ms_max = max(agg.ms_max, e.response_ms)
            agg.latency.update(e.response_ms)
            agg.clients.update(e.client)
            agg.estimated = agg.estimated or self.rate < 1.0
            self.dirty.add(key)
        return {"accepted": len(inserted), "duplicates": len(events) - len(rejected) - sampled_out - len(inserted),
                "sampled_out": sampled_out, "rejected": rejected}

    def before_commit(self, c: apsw.Connection) -> None:
        for key in self.dirty:
            self._write(c, key, self.cache[key])
        self.dirty.clear()

    def _capped(self, c: apsw.Connection, hour: int, path: str) -> str:
        known = self.paths_by_hour.get(hour)
        if known is None:
            known = self.paths_by_hour[hour] = {
                p for (p,) in c.execute("SELECT path FROM path_stats_hourly WHERE hour = ?", (hour,))}
        if path in known:
            return path
        if len(known) >= self.max_paths:
            known.add(self.other)
            return self.other
        known.add(path)
        return path

    def _agg(self, c: apsw.Connection, key: tuple[int, str]) -> Agg:
        agg = self.cache.get(key)
        if agg is None:
            rows = c.execute("SELECT requests, status_4xx, status_5xx, bytes, ms_sum, ms_min, ms_max, latency, clients,"
                             " estimated FROM path_stats_hourly WHERE hour = ? AND path = ?", key).fetchall()
            if rows:
                r = rows[0]
                agg = Agg(r[0], r[1], r[2], r[3], r[4], r[5], r[6], ds.kll_floats_sketch.deserialize(r[7]),
                          ds.hll_sketch.deserialize(r[8]), bool(r[9]))
            else:
                agg = Agg()
            self.cache[key] = agg
        return agg

    def _write(self, c: apsw.Connection, key: tuple[int, str], agg: Agg) -> None:
        c.execute(
            "INSERT INTO path_stats_hourly (hour, path, requests, status_4xx, status_5xx, bytes, ms_sum, ms_min,"
            " ms_max, latency, clients, estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (hour, path) DO UPDATE SET requests = excluded.requests, status_4xx = excluded.status_4xx,"
            " status_5xx = excluded.status_5xx, bytes = excluded.bytes, ms_sum = excluded.ms_sum,"
            " ms_min = excluded.ms_min, ms_max = excluded.ms_max, latency = excluded.latency,"
            " clients = excluded.clients, estimated = excluded.estimated",
            (*key, agg.requests, agg.s4xx, agg.s5xx, agg.bytes, agg.ms_sum, agg.ms_min, agg.ms_max,
             agg.latency.serialize(), agg.clients.serialize_compact(), int(agg.estimated)))

    def on_rollback(self) -> None:
        """Nothing to undo: a message folds only after its one insert succeeded (see ingest)."""

    def on_tick_failed(self) -> None:
        """The inbox drain (a transaction of its own) was rolled back: forget what it folded."""
        self.cache.clear()
        self.dirty.clear()
        self.paths_by_hour.clear()

    # ---- housekeeping ---------------------------------------------------------------------------------------

    def tick(self, c: apsw.Connection, now: float) -> list:
        rows = c.execute("SELECT id, event FROM traffic_inbox WHERE shard = ? ORDER BY id LIMIT ?",
                         (self.shard, INBOX_BATCH)).fetchall()
        if rows:
            events, bad = [], 0
            for _row_id, text in rows:  # each row on its own: one bad row must not stop the rest (or the actor)
                try:
                    events.append(msgspec.convert(orjson.loads(text), Event))
                except (msgspec.ValidationError, orjson.JSONDecodeError) as e:
                    bad += 1
                    c.execute("INSERT INTO actor_dead_letters (actor, fingerprint, message, error, failures, at)"
                              " VALUES ('paths', 'inbox', ?, ?, 1, ?)", (text[:4000], f"bad inbox row: {e}"[:500],
                                                                          time.time()))
            result = self.ingest(c, events)
            c.execute(f"DELETE FROM traffic_inbox WHERE id IN ({','.join(str(r[0]) for r in rows)})")
            self.log.info("paths.inbox_drained", events=len(rows), accepted=result["accepted"],
                          duplicates=result["duplicates"], dead_lettered=bad + len(result["rejected"]))
        if now >= self.next_prune:
            # Detail rows older than the retention go (the hourly aggregates stay); a bounded chunk per tick.
            self.next_prune = now + 60
            cutoff_ms = int((now - self.loaded.config.paths.retention_days * 86400) * 1000)
            # ids start with the 13-digit ts_ms, so id order is time order: the primary key finds them.
            c.execute("DELETE FROM traffic_events WHERE id IN (SELECT id FROM traffic_events WHERE id < ?"
                      " LIMIT 50000)", (f"{cutoff_ms:013d}-",))
        oldest = int(now // 3600 * 3600) - 3600 * (HOURS_IN_MEMORY - 1)
        self.before_commit(c)  # the inbox's folds, before older hours leave the cache
        for key in [k for k in self.cache if k[0] < oldest]:
            del self.cache[key]
        for hour in [h for h in self.paths_by_hour if h < oldest]:
            del self.paths_by_hour[hour]
        return []

    def next_tick(self, now: float) -> float:
        return now + 1.0


_INSERT = (
    "INSERT INTO traffic_events (id, ts_ms, path, method, status, response_ms, client, bytes)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7"
    " FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING RETURNING id"
)


def _check(e: Event) -> str | None:
    if not ID_RE.match(e.id):
        return f"id {e.id!r}: expected <13-digit ts_ms>-<8 lowercase hex>"
    if not e.path.startswith("/") or len(e.path) > MAX_PATH:
        return f"path {e.path[:80]!r}: expected a path starting with / of at most {MAX_PATH} characters"
    if not 100 <= e.status <= 599:
        return f"status {e.status}: expected 100 to 599"
    if not 0 <= e.response_ms < 1e9:  # also refuses NaN and infinity, which a sketch must never see
        return f"response_ms {e.response_ms}: expected a duration >= 0"
    return None


def read_stats(c: apsw.Connection, hour: int | None = None, path: str | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
    """path_stats_hourly rows, hottest first, with quantiles and unique clients read from their sketches."""
    sql, args = "SELECT hour, path, requests, status_4xx, status_5xx, bytes, ms_sum, ms_min, ms_max, latency, " \
                "clients, estimated FROM path_stats_hourly", []
    where = []
    if hour is not None:
        where.append("hour = ?")
        args.append(hour)
    if path is not None:
        where.append("path = ?")
        args.append(path)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY requests DESC LIMIT ?"
    args.append(limit)
    out = []
    for hour_, path_, req, s4, s5, by, ms_sum, ms_min, ms_max, lat, cli, est in c.execute(sql, args):
        kll = ds.kll_floats_sketch.deserialize(lat)
        out.append({"hour": hour_, "path": path_, "requests": req, "status_4xx": s4, "status_5xx": s5, "bytes": by,
                    "ms_avg": ms_sum / req if req else 0.0, "ms_min": ms_min, "ms_max": ms_max,
                    "p50_ms": kll.get_quantile(0.5), "p95_ms": kll.get_quantile(0.95),
                    "p99_ms": kll.get_quantile(0.99), "unique_clients": ds.hll_sketch.deserialize(cli).get_estimate(),
                    "estimated": bool(est)})
    return out
