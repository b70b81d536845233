"""GET /metrics against a real supervisor tree: jobs run by worker processes (and failed by the supervisor when a
worker dies), a submit refused by a limit in this process, rate-limit checks, a gate queue and traffic events at
the actors — then the exposition parsed with prometheus_client's own parser and held to the exact numbers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import cardq
from cardq.config import load_config
from cardq.running import http_address
from cardq.web.server import _listen

from conftest import wait_for
from supervision import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CONFIG = {
    "http": {"enabled": True, "listen": "127.0.0.1:0"},
    # One claim per attempt: a batch never gives jobs back, so the claims are exactly the attempts.
    "workers": {"prefetch": 1},
    "ratelimit": {"policies": {"t:*": {"limit": 2, "window_s": 600}}},
    "gates": {"metered": {"max_concurrency": 1, "max_queue": 1, "queue_timeout_ms": 60_000}},
}


class Scrape:
    """One GET /metrics, parsed: value(name, **labels) of one sample."""

    def __init__(self, url: str, token: str):
        r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        self.text = r.text
        self.families = {f.name: f for f in text_string_to_metric_families(r.text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for f in self.families.values() for s in f.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def durable(self) -> dict:
        """What the store keeps: must read the same after a restart."""
        names = ("cardq_jobs", "cardq_jobs_submitted_total", "cardq_jobs_claimed_total", "cardq_jobs_done_total",
                 "cardq_jobs_failed_total", "cardq_jobs_dead_total", "cardq_jobs_cancelled_total",
                 "cardq_job_duration_seconds_bucket", "cardq_job_duration_seconds_count",
                 "cardq_job_duration_seconds_sum", "cardq_limit_rejections_total")
        return {name: self.series(name) for name in names}


def start(d: Deployment) -> str:
    d.start()
    url = wait_for(lambda: http_address(d.loaded.run_dir), 60, what="the HTTP server listening")
    wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 60, 0.05, "ready")
    return url


def run_jobs(q: cardq.Queue, kind: str, payloads: list[dict]) -> None:
    ids = q.submit(payloads, user="u1", plan="enterprise", kind=kind).ids
    assert all(j.finished for j in q.wait(ids, timeout=120)), f"{kind} jobs did not finish"


def test_metrics_count_what_every_process_did(tmp_path: Path):
    d = Deployment(tmp_path, **CONFIG)
    try:
        url = start(d)
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401  # a read token is needed
        with cardq.connect(d.config_path, name="test") as q:
            token = q.create_token("read", "prometheus").token
            # Workers run them; the supervisor fails the attempts of the job that kills its worker.
            run_jobs(q, "alpha", [{}, {}, {"sleep": 0.3}])
            run_jobs(q, "beta", [{}, {}, {"fail": "no", "permanent": True}, {"fail": "again"}])
            run_jobs(q, "gamma", [{"exit": 3}])
            # This process's submit refused by a limit.
            with pytest.raises(cardq.LimitExceeded):
                q.submit([{}] * 6, user="u9", plan="free")
            # Rate-limit checks at the actor: 2 allowed by policy t:*, then denied.
            assert [q.ratelimit.check("t:1").allowed for _ in range(3)] == [True, True, False]
            # The gate: its one permit held here, a second caller queued at the actor, a third turned away.
            granted = threading.Event()

            def second() -> None:
                with q.gate("metered"):
                    granted.set()

            with q.gate("metered"):
                waiter = threading.Thread(target=second)
                waiter.start()
                wait_for(lambda: q.gate_stats()["metered"]["queued"] == 1, 60, what="the second caller queued")
                with pytest.raises(cardq.Overloaded), q.gate("metered"):
                    pass
            waiter.join(60)
            assert granted.is_set()
            # Traffic events: 3 new, then the same 3 again (duplicates).
            now_ms = int(time.time() * 1000)
            events = [{"path": f"/p/{i}", "status": 200, "response_ms": 1.5, "client_ip": "10.0.0.1",
                       "request_id": f"r{i}", "ts_ms": now_ms} for i in range(3)]
            assert q.record_events(events).accepted == 3
            assert q.record_events(events).duplicates == 3
            # Reloads: a broken file refused, then a valid change applied.
            good = d.config_path.read_text()
            d.config_path.write_text("[[[ not toml")
            assert q.reload()["applied"] is False
            d.write_config(cards={"simulate_latency_ms": 1.0})
            assert good != d.config_path.read_text()
            assert q.reload()["applied"] is True
            digest = load_config(d.config_path).digest

        # The worker's restarts reach the published process table within a heartbeat.
        wait_for(lambda: sum(Scrape(url, token).series("cardq_child_restarts_total").values()) == 3, 60, 0.2,
                 "the killed worker's restarts published")
        m = Scrape(url, token)

        # Jobs, by kind: counted by the worker processes and the supervisor, read by the HTTP server's process.
        expected = {  # kind: submitted, claimed (= attempts), done, failed attempts, dead
            "alpha": (3, 3, 3, 0, 0),
            "beta": (4, 8, 2, 6, 2),   # the permanent failure: 1 attempt; "again": 5 attempts, then dead
            "gamma": (1, 3, 0, 3, 1),  # killed its worker 3 times: dead
        }
        for kind, (submitted, claimed, done, failed, dead) in expected.items():
            got = tuple(m.value(f"cardq_jobs_{what}_total", kind=kind)
                        for what in ("submitted", "claimed", "done", "failed", "dead"))
            assert got == (submitted, claimed, done, failed, dead), kind
            assert m.value("cardq_jobs_cancelled_total", kind=kind) == 0
            assert (m.get("cardq_job_duration_seconds_count", kind=kind) or 0) == done
        # The 0.3 s job slept at least 0.3 s: above the 0.25 bucket, inside +Inf.
        assert m.value("cardq_job_duration_seconds_bucket", kind="alpha", le="0.25") <= 2
        assert m.value("cardq_job_duration_seconds_bucket", kind="alpha", le="+Inf") == 3
        assert m.value("cardq_job_duration_seconds_sum", kind="alpha") >= 0.3
        # The same numbers as the jobs table, by state.
        assert d.statuses() == {"done": 5, "dead": 3}
        for state in ("queued", "scheduled", "processing", "done", "dead", "cancelled"):
            assert m.value("cardq_jobs", state=state) == d.statuses().get(state, 0), state
        assert m.value("cardq_oldest_queued_job_age_seconds") == 0

        assert m.value("cardq_limit_rejections_total", limit="daily.free") == 1
        assert m.value("cardq_ratelimit_decisions_total", policy="t:*", result="allowed", shard="0") == 2
        assert m.value("cardq_ratelimit_decisions_total", policy="t:*", result="denied", shard="0") == 1
        assert m.value("cardq_actor_messages_total", actor="ratelimit", shard="0", op="check") == 3
        assert m.value("cardq_actor_ask_seconds_count", actor="ratelimit", shard="0") >= 3

        assert (m.value("cardq_gate_active", gate="metered"), m.value("cardq_gate_queued", gate="metered")) == (0, 0)
        assert m.value("cardq_gate_limit", gate="metered") == 1
        assert m.value("cardq_gate_dropped_total", gate="metered") == 1
        assert m.value("cardq_gate_wait_seconds_count", gate="metered") == 1  # the one caller that queued
        assert m.value("cardq_gate_wait_seconds_sum", gate="metered") > 0

        assert m.value("cardq_events_ingested_total", shard="0") == 3
        assert m.value("cardq_events_duplicates_total", shard="0") == 3
        assert m.value("cardq_events_inbox") == 0

        workers = {labels: n for labels, n in m.series("cardq_child_restarts_total").items()
                   if dict(labels)["child"].startswith("worker-")}
        assert sum(workers.values()) == 3
        assert m.value("cardq_config_reloads_total", result="applied") == 1
        assert m.value("cardq_config_reloads_total", result="failed") == 1
        assert m.value("cardq_config_info", digest=digest) == 1
        assert m.value("cardq_supervisor_up") == 1
        assert all(v == 1 for v in m.series("cardq_actor_up").values()) and len(m.series("cardq_actor_up")) == 3
        assert m.value("cardq_database_size_bytes") > 0 and m.value("cardq_wal_size_bytes") >= 0
    finally:
        d.close()


def test_durable_figures_survive_a_supervisor_restart(tmp_path: Path):
    d = Deployment(tmp_path, **CONFIG)
    try:
        url = start(d)
        with cardq.connect(d.config_path, name="test") as q:
            token = q.create_token("read").token
            run_jobs(q, "a", [{}, {}, {"fail": "x", "permanent": True}])
            with pytest.raises(cardq.LimitExceeded):
                q.submit([{}] * 6, user="u9", plan="free")
            assert q.ratelimit.check("t:1").allowed
            before = Scrape(url, token)
            assert before.value("cardq_ratelimit_decisions_total", policy="t:*", result="allowed", shard="0") == 1
            q.stop()
        url = start(d)
        after = Scrape(url, token)
        assert after.durable() == before.durable()
        assert after.value("cardq_jobs_done_total", kind="a") == 2 and after.value("cardq_jobs", state="dead") == 1
        assert after.value("cardq_limit_rejections_total", limit="daily.free") == 1
        # The rate limiter's counts are its process's: a restart starts them again (a Prometheus counter reset).
        assert after.get("cardq_ratelimit_decisions_total", policy="t:*", result="allowed", shard="0") is None
    finally:
        d.close()


def test_http_connections_send_without_waiting_for_acks(tmp_path: Path):
    """A scrape must not wait ~40 ms for a delayed ACK (Nagle): asyncio sets TCP_NODELAY on the connections of a
    socket made with proto IPPROTO_TCP only, so the server's listening socket must be one."""
    d = Deployment(tmp_path, http={"enabled": True, "listen": "127.0.0.1:0"})
    try:
        listener = _listen(d.loaded)

        async def nodelay_of_an_accepted_connection() -> int:
            got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                writer.close()

            server = await asyncio.start_server(accepted, sock=listener)
            async with server:
                _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
                value = await asyncio.wait_for(got, 30)
                writer.close()
            return value

        assert asyncio.run(nodelay_of_an_accepted_connection()) != 0
    finally:
        d.close()
