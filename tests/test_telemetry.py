"""An actor's in-memory figures (actors/telemetry.py), and the exposition cardq/web/metrics.py makes of a
snapshot — without processes: the tree-level test is tests/test_metrics.py."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cardq.actors.telemetry import ASK_BOUNDS, Histogram, Telemetry
from cardq.api import MetricsSnapshot
from cardq.store.totals import DURATION_BOUNDS, Figures
from cardq.store.totals import Histogram as StoredHistogram
from cardq.web.metrics import SnapshotCollector


def test_counts_stand_once_their_batch_commits():
    t = Telemetry()
    t.count("ratelimit", "*", "allowed")
    t.observe(("gate_wait", "g"), (1.0,), 0.5)
    t.discard()  # the batch's transaction failed: as if never counted
    t.count("ratelimit", "*", "allowed", n=2)
    t.observe(("gate_wait", "g"), (1.0,), 0.5)
    assert t.to_dict() == {"counts": [], "histograms": []}
    t.commit()
    assert t.to_dict() == {"counts": [["ratelimit", "*", "allowed", 2]],
                           "histograms": [["gate_wait", "g", {"bounds": [1.0], "counts": [1, 0], "sum": 0.5}]]}


def test_a_histogram_puts_a_value_on_its_bound_in_that_bucket():
    h = Histogram((0.1, 1.0))
    for v in (0.1, 0.2, 1.0, 7.0):
        h.observe(v)
    h.observe(0.05, n=3)
    assert h.counts == [4, 2, 1] and math.isclose(h.sum, 8.45)


def exposition(snapshot: MetricsSnapshot) -> dict:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_exposition_of_a_snapshot():
    counts = [0] * len(DURATION_BOUNDS)
    counts[0], counts[-1] = 2, 1  # two quick jobs, one past 300 s
    figures = Figures(
        jobs_by_state={"queued": 4, "scheduled": 0, "processing": 1, "done": 3, "dead": 0, "cancelled": 0},
        oldest_queued_age_s=12.5, totals={"submitted": {"card": 8}, "claimed": {"card": 4}},
        durations={"card": StoredHistogram(list(DURATION_BOUNDS), counts, 400.0)},
        limit_rejections={"daily.free": 2}, inbox_events=0, database_bytes=4096, wal_bytes=0)
    ask = Histogram(ASK_BOUNDS)
    ask.observe(0.0003, n=5)
    actors = [
        {"actor": "ratelimit", "shard": 0, "counts": [["ratelimit", "*", "denied", 7], ["messages", "check", 7]],
         "histograms": [["ask_seconds", ask.to_dict()]],
         "gates": {"generation": {"active": 2, "queued": 1, "limit": 4, "dropped_since_boot": 3}}},
        {"actor": "paths", "shard": 0, "error": "paths-0: no answer within 0.5 s"},
    ]
    m = exposition(MetricsSnapshot(figures, {"config_digest": "abc123", "reloads_applied": 2}, [
        {"name": "worker-1", "role": "worker", "pid": 10, "state": "idle", "restarts": 1},
        {"name": "paths-0", "role": "actor", "pid": None, "state": "restarting", "restarts": 4}], actors))

    def v(name: str, **labels: str) -> float:
        return m[(name, frozenset(labels.items()))]

    assert v("cardq_jobs", state="queued") == 4 and v("cardq_oldest_queued_job_age_seconds") == 12.5
    assert v("cardq_jobs_submitted_total", kind="card") == 8 and v("cardq_jobs_dead_total", kind="card") == 0
    assert v("cardq_jobs_done_total", kind="card") == 3
    assert v("cardq_job_duration_seconds_bucket", kind="card", le="0.001") == 2
    assert v("cardq_job_duration_seconds_bucket", kind="card", le="300.0") == 2
    assert v("cardq_job_duration_seconds_bucket", kind="card", le="+Inf") == 3
    assert v("cardq_limit_rejections_total", limit="daily.free") == 2
    assert v("cardq_config_info", digest="abc123") == 1
    assert v("cardq_config_reloads_total", result="applied") == 2 and v("cardq_config_reloads_total",
                                                                         result="failed") == 0
    assert v("cardq_child_restarts_total", child="paths-0") == 4 and v("cardq_child_up", child="paths-0") == 0
    assert v("cardq_ratelimit_decisions_total", policy="default", result="denied", shard="0") == 7
    assert v("cardq_actor_ask_seconds_bucket", actor="ratelimit", shard="0", le="0.00025") == 0
    assert v("cardq_actor_ask_seconds_bucket", actor="ratelimit", shard="0", le="0.0005") == 5
    assert v("cardq_actor_ask_seconds_bucket", actor="ratelimit", shard="0", le="+Inf") == 5
    assert (v("cardq_gate_active", gate="generation"), v("cardq_gate_queued", gate="generation"),
            v("cardq_gate_dropped_total", gate="generation")) == (2, 1, 3)
    assert v("cardq_gate_wait_seconds_count", gate="generation") == 0  # nobody queued yet: a zero, not nothing
    assert v("cardq_actor_up", actor="ratelimit", shard="0") == 1 and v("cardq_actor_up", actor="paths",
                                                                        shard="0") == 0
    assert not any(name == "cardq_events_ingested_total" for name, _ in m)  # an actor that did not answer
