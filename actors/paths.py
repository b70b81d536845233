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

import datasketches as ds
import msgspec
import orjson

from cardq.actors.server import Behaviour, Peer
from cardq.actors.traffic import OTHER, Event
from cardq.config import LoadedConfig
from cardq.store import dead_letters, traffic
from cardq.store.db import Database, Tx

KLL_K = 200  # normalized rank error ~1.65%
HLL_LG_K = 14  # relative standard error ~0.8% once in HLL mode; exact-ish (coupon list/set) below ~2k
HOURS_IN_MEMORY = 2
INBOX_BATCH = 2000
INBOX_IDLE_MAX_S = 8.0  # the longest an event in the inbox (the collector was down) waits to be drained


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
        self.tick_every = 1.0  # seconds to the next inbox drain (see tick)
        self.late_events = 0  # refused as older than the retention, since this process started
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

    def record(self, tx: Tx, peer: Peer, a: Record, msg_id: int | None) -> dict[str, Any]:
        return self.ingest(tx, a.events)

    def ingest(self, tx: Tx, events: list[Event]) -> dict[str, Any]:
        """Insert the new events in one statement, then fold exactly the ones it reports as inserted into the
        in-memory aggregates (pure Python that cannot fail on an event msgspec validated on arrival, so a failed
        insert leaves them untouched); before_commit writes the touched aggregates once per transaction."""
        keep: dict[str, Event] = {}
        sampled_out = late = 0
        # Older than the retention, an event's detail row may already be pruned: a replay could no longer be
        # recognised as one, and would be counted twice. Such an event is refused as late (and counted).
        cutoff_ms = int((time.time() - self.loaded.config.paths.retention_days * 86400) * 1000)
        for e in events:
            if e.ts_ms < cutoff_ms:
                late += 1
            elif self.rate < 1.0 and int(e.id[-8:], 16) / 2**32 >= self.rate:
                sampled_out += 1
            else:
                keep.setdefault(e.id, e)
        if late:
            self.late_events += late
            self.log.warning("paths.late_events", refused=late, late_since_boot=self.late_events,
                             retention_days=self.loaded.config.paths.retention_days)
        inserted = traffic.insert_events(tx, [e.row() for e in keep.values()])
        scale = 1.0 / self.rate
        for event_id in inserted:
            e = keep[event_id]
            hour = e.ts_ms // 3_600_000 * 3600
            key = (hour, self._capped(tx, hour, e.path))
            agg = self._agg(tx, key)
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
        counts = {"accepted": len(inserted), "duplicates": len(events) - late - sampled_out - len(inserted),
                  "sampled_out": sampled_out, "late": late}
        for what, n in counts.items():
            if n:
                self.telemetry.count("events", what, n=n)
        return counts

    def before_commit(self, tx: Tx) -> None:
        for hour, path in self.dirty:
            a = self.cache[(hour, path)]
            traffic.save_hour(tx, hour, path, traffic.HourStats(
                a.requests, a.s4xx, a.s5xx, a.bytes, a.ms_sum, a.ms_min, a.ms_max, a.latency.serialize(),
                a.clients.serialize_compact(), a.estimated))
        self.dirty.clear()

    def _capped(self, tx: Tx, hour: int, path: str) -> str:
        known = self.paths_by_hour.get(hour)
        if known is None:
            known = self.paths_by_hour[hour] = traffic.hour_paths(tx, hour)
        if path in known:
            return path
        if len(known) >= self.max_paths:
            known.add(self.other)
            return self.other
        known.add(path)
        return path

    def _agg(self, tx: Tx, key: tuple[int, str]) -> Agg:
        agg = self.cache.get(key)
        if agg is None:
            s = traffic.load_hour(tx, *key)
            if s is not None:
                agg = Agg(s.requests, s.status_4xx, s.status_5xx, s.bytes, s.ms_sum, s.ms_min, s.ms_max,
                          ds.kll_floats_sketch.deserialize(s.latency), ds.hll_sketch.deserialize(s.clients),
                          s.estimated)
            else:
                agg = Agg()
            self.cache[key] = agg
        return agg

    def on_rollback(self) -> None:
        """Nothing to undo: a message folds only after its one insert succeeded (see ingest)."""

    def on_tick_failed(self) -> None:
        """The inbox drain (a transaction of its own) was rolled back: forget what it folded."""
        self.cache.clear()
        self.dirty.clear()
        self.paths_by_hour.clear()

    # ---- housekeeping ---------------------------------------------------------------------------------------

    def tick(self, tx: Tx, now: float) -> list:
        rows = traffic.inbox_take(tx, self.shard, INBOX_BATCH)
        # An empty inbox (the usual: apps reach this actor directly) is looked at less and less often, up to
        # every INBOX_IDLE_MAX_S; one with rows, at once again (each wake-up of an idle process costs CPU).
        self.tick_every = 1.0 if rows else min(INBOX_IDLE_MAX_S, self.tick_every * 2)
        if rows:
            events, bad = [], 0
            for _row_id, text in rows:  # each row on its own: one bad row must not stop the rest (or the actor)
                try:
                    events.append(msgspec.convert(orjson.loads(text), Event, strict=True))
                except (msgspec.ValidationError, orjson.JSONDecodeError) as e:
                    bad += 1
                    dead_letters.add(tx, self.name, "inbox", text[:4000], f"bad inbox row: {e}", 1, now)
            result = self.ingest(tx, events)
            traffic.inbox_delete(tx, [r[0] for r in rows])
            self.log.info("paths.inbox_drained", events=len(rows), accepted=result["accepted"],
                          duplicates=result["duplicates"], dead_lettered=bad)
        if now >= self.next_prune:
            # Detail rows older than the retention go (the hourly aggregates stay); a bounded chunk per tick.
            self.next_prune = now + 60
            cutoff_ms = int((now - self.loaded.config.paths.retention_days * 86400) * 1000)
            traffic.prune_events(tx, cutoff_ms, 50_000)
        oldest = int(now // 3600 * 3600) - 3600 * (HOURS_IN_MEMORY - 1)
        self.before_commit(tx)  # the inbox's folds, before older hours leave the cache
        for key in [k for k in self.cache if k[0] < oldest]:
            del self.cache[key]
        for hour in [h for h in self.paths_by_hour if h < oldest]:
            del self.paths_by_hour[hour]
        return []

    def next_tick(self, now: float) -> float:
        return now + self.tick_every


def read_stats(db: Database, hour: int | None = None, path: str | None = None, since: int | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
    """path_stats_hourly rows, hottest first, with quantiles and unique clients read from their sketches."""
    out = []
    for row in traffic.hourly(db, hour=hour, path=path, since=since, limit=limit):
        s = row.stats
        kll = ds.kll_floats_sketch.deserialize(s.latency)
        out.append({"hour": row.hour, "path": row.path, "requests": s.requests, "status_4xx": s.status_4xx,
                    "status_5xx": s.status_5xx, "bytes": s.bytes, "ms_avg": s.ms_sum / s.requests if s.requests
                    else 0.0, "ms_min": s.ms_min, "ms_max": s.ms_max, "p50_ms": kll.get_quantile(0.5),
                    "p95_ms": kll.get_quantile(0.95), "p99_ms": kll.get_quantile(0.99),
                    "unique_clients": ds.hll_sketch.deserialize(s.clients).get_estimate(), "estimated": s.estimated})
    return out
