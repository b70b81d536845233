"""GET /metrics: cardq's figures in the Prometheus text format.

Made afresh on each scrape from `Queue.metrics()` — the public API gathers them from the processes that hold them:
the store's durable totals (counted by whichever process moved each job), the supervisor's published process
table, and each actor's own figures asked over its socket — by a Collector registered on a CollectorRegistry of
its own: no global registry, nothing kept between scrapes. README.md ("### Metrics") lists every name, its type
and its labels; every label set is bounded (kinds by [metrics] max_kinds, gates and policies by config.toml,
children and shards by the tree's size; never a user, a key or a path).

Counters that actors keep in memory carry a `shard` label: each shard's count restarts at zero with its process,
and a sum over shards would look like a counter that went back (to Prometheus, a reset of the whole sum).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from cardq.api import MetricsSnapshot
from cardq.vocabulary import STATUSES

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format every Prometheus scrapes

JOB_EVENTS = {  # store totals -> (metric, help)
    "submitted": ("cardq_jobs_submitted", "Jobs submitted (an idempotent resubmit that mapped to an existing job "
                  "is not counted)"),
    "claimed": ("cardq_jobs_claimed", "Job claims by workers (a prefetched job given back unstarted was claimed)"),
    "failed": ("cardq_jobs_failed", "Failed attempts (retried or not; a timeout, a lost lease, a killed worker "
               "included)"),
    "dead": ("cardq_jobs_dead", "Jobs that went to the dead-letter state"),
    "cancelled": ("cardq_jobs_cancelled", "Jobs cancelled by an operator"),
}
EVENT_COUNTS = {  # path collector counts -> (metric, help)
    "accepted": ("cardq_events_ingested", "Traffic events ingested by the path collector (new ids)"),
    "duplicates": ("cardq_events_duplicates", "Traffic events seen before (a resend), counted once"),
    "late": ("cardq_events_late", "Traffic events refused as older than paths.retention_days"),
    "sampled_out": ("cardq_events_sampled_out", "Traffic events left out by paths.sampling_rate"),
}


def render(web: Any) -> bytes:
    """The exposition, from one gathering of the figures (called on the server's thread pool: it blocks)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(web.q.metrics()))
    return generate_latest(registry)


class SnapshotCollector:
    """A prometheus_client Collector over one MetricsSnapshot."""

    def __init__(self, snapshot: MetricsSnapshot):
        self.s = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from jobs(self.s.store)
        yield from store(self.s.store)
        yield from supervisor(self.s.supervisor, self.s.children)
        yield from actors(self.s.actors)


def jobs(f: Any) -> Iterator[Metric]:
    by_state = GaugeMetricFamily("cardq_jobs", "Jobs in each state now", labels=["state"])
    for state in STATUSES:
        by_state.add_metric([state], f.jobs_by_state.get(state, 0))
    yield by_state
    yield GaugeMetricFamily("cardq_oldest_queued_job_age_seconds",
                            "Age of the oldest queued job (since it was submitted; 0 when none is queued)",
                            value=f.oldest_queued_age_s or 0.0)
    kinds = sorted({k for per_kind in f.totals.values() for k in per_kind} | f.durations.keys())
    for event, (name, doc) in JOB_EVENTS.items():
        family = CounterMetricFamily(name, doc, labels=["kind"])
        for kind in kinds:
            family.add_metric([kind], f.totals.get(event, {}).get(kind, 0))
        yield family
    done = CounterMetricFamily("cardq_jobs_done", "Jobs done", labels=["kind"])
    durations = HistogramMetricFamily("cardq_job_duration_seconds", "How long done jobs' handlers ran",
                                      labels=["kind"])
    for kind in kinds:
        h = f.durations.get(kind)
        done.add_metric([kind], sum(h.counts) if h is not None else 0)
        if h is not None:
            durations.add_metric([kind], _buckets(h.bounds, h.counts), h.sum)
    yield done
    yield durations


def store(f: Any) -> Iterator[Metric]:
    rejections = CounterMetricFamily("cardq_limit_rejections", "Submits refused by a limit (nothing inserted)",
                                     labels=["limit"])
    for limit, n in sorted(f.limit_rejections.items()):
        rejections.add_metric([limit], n)
    yield rejections
    yield GaugeMetricFamily("cardq_events_inbox", "Traffic events waiting in the durable inbox for the collector",
                            value=f.inbox_events)
    yield GaugeMetricFamily("cardq_database_size_bytes", "The database file's size", value=f.database_bytes)
    yield GaugeMetricFamily("cardq_wal_size_bytes", "The database's write-ahead log's size", value=f.wal_bytes)


def supervisor(info: dict[str, Any] | None, children: list[dict[str, Any]]) -> Iterator[Metric]:
    yield GaugeMetricFamily("cardq_supervisor_up", "1 while a supervisor runs this database", value=int(bool(info)))
    if info is None:
        return
    yield InfoMetricFamily("cardq_config", "The config in effect in the supervisor (its file's digest)",
                           value={"digest": str(info.get("config_digest"))})
    reloads = CounterMetricFamily("cardq_config_reloads", "Config reloads (SIGHUP) since the supervisor started",
                                  labels=["result"])
    reloads.add_metric(["applied"], info.get("reloads_applied", 0))
    reloads.add_metric(["failed"], info.get("reloads_failed", 0))
    yield reloads
    restarts = CounterMetricFamily("cardq_child_restarts", "Restarts of each child since the supervisor started",
                                   labels=["child"])
    up = GaugeMetricFamily("cardq_child_up", "1 while the child runs", labels=["child"])
    for c in children:
        restarts.add_metric([c["name"]], c["restarts"])
        up.add_metric([c["name"]], int(c["pid"] is not None and c["state"] not in ("restarting", "stopped")))
    yield restarts
    yield up


def actors(answers: list[dict[str, Any]]) -> Iterator[Metric]:
    up = GaugeMetricFamily("cardq_actor_up", "1 when the actor shard answered this scrape", labels=["actor", "shard"])
    messages = CounterMetricFamily("cardq_actor_messages", "Messages each actor shard handled since it started",
                                   labels=["actor", "shard", "op"])
    asks = HistogramMetricFamily("cardq_actor_ask_seconds", "Each ask's time in the actor shard: from its batch "
                                 "being read to the answers sent, the batch's commit included",
                                 labels=["actor", "shard"])
    decisions = CounterMetricFamily("cardq_ratelimit_decisions", "Rate-limit checks by policy and result, since "
                                    "the rate-limiter shard started", labels=["policy", "result", "shard"])
    events = {what: CounterMetricFamily(name, doc + ", since the collector shard started", labels=["shard"])
              for what, (name, doc) in EVENT_COUNTS.items()}
    gauges = {"active": GaugeMetricFamily("cardq_gate_active", "Permits of the gate held now (every holder)",
                                          labels=["gate"]),
              "queued": GaugeMetricFamily("cardq_gate_queued", "Callers waiting in the gate's queue now",
                                          labels=["gate"]),
              "limit": GaugeMetricFamily("cardq_gate_limit", "Permits the gate allows now (an adaptive gate's "
                                         "learned limit)", labels=["gate"])}
    dropped = CounterMetricFamily("cardq_gate_dropped", "Callers the gate turned away (its queue full, or no "
                                  "permit in time), since the rate-limiter shard started", labels=["gate"])
    waits = HistogramMetricFamily("cardq_gate_wait_seconds", "How long callers that queued at the gate waited for "
                                  "their permit (one taken at once in the caller's own process never queues)",
                                  labels=["gate"])
    for a in answers:
        actor, shard = str(a["actor"]), str(a["shard"])
        up.add_metric([actor, shard], int("error" not in a))
        if "error" in a:
            continue
        counts = {tuple(key): n for *key, n in a.get("counts", [])}
        for key, n in sorted(counts.items()):
            if key[0] == "messages":
                messages.add_metric([actor, shard, key[1]], n)
            elif key[0] == "ratelimit":
                policy = "default" if key[1] in ("", "*") else key[1]  # as RateLimit-Policy names it
                decisions.add_metric([policy, key[2], shard], n)
        if actor == "paths":  # (a zero for what never happened: the series exist from the collector's start)
            for what, family in events.items():
                family.add_metric([shard], counts.get(("events", what), 0))
        seen_waits = set()
        for *key, h in a.get("histograms", []):
            if key[0] == "ask_seconds":
                asks.add_metric([actor, shard], _buckets(h["bounds"], h["counts"]), h["sum"])
            elif key[0] == "gate_wait":
                waits.add_metric([key[1]], _buckets(h["bounds"], h["counts"]), h["sum"])
                seen_waits.add(key[1])
        for gate, g in sorted(a.get("gates", {}).items()):
            for what, family in gauges.items():
                family.add_metric([gate], g[what])
            dropped.add_metric([gate], g["dropped_since_boot"])
            if gate not in seen_waits:  # no caller queued yet: the series exists, at zero
                waits.add_metric([gate], [("+Inf", 0)], 0.0)
    yield from (up, messages, asks, decisions, *events.values(), *gauges.values(), dropped, waits)


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs ending with +Inf, from per-bucket counts: `counts` has one more entry than the
    finite bounds (the +Inf bucket), or as many as `bounds` when its last bound is +inf already."""
    out, total = [], 0
    for i, n in enumerate(counts):
        total += n
        le = bounds[i] if i < len(bounds) else float("inf")
        out.append((floatToGoString(le), total))
    if out[-1][0] != "+Inf":
        out.append(("+Inf", total))
    return out
