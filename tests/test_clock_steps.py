"""Steps of the wall clock (an NTP correction, a VM resumed or restored) change no duration: job timeouts run
on the monotonic clock, leases of live workers are not 'expired' by a jump forward, and neither retries in
backoff nor a rate-limited key nor a gate's waiter wait out a jump back. Each test injects the step through the
time it passes."""

from __future__ import annotations

import os
import random
import time
from multiprocessing import Pipe

import pytest

from cardq.actors.ratelimit import Acquire, Policy, RateLimiter, gcra
from cardq.actors.server import Peer
from cardq.children import ChildSpec
from cardq.config import load_config
from cardq.store import jobs
from cardq.store.submit import NewJob, submit
from cardq.supervisor import Supervisor
from cardq.tracked import TrackedChild

T0 = 1_800_000_000.0
DAY = 86400.0


class _Process:
    """Stands in for the child's process object: alive, and records a kill (no process is started here)."""

    exitcode = None
    pid = 4242

    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True


def test_a_wall_clock_jump_forward_kills_no_busy_worker(monkeypatch):
    sup = Supervisor(load_config(None))
    child = TrackedChild(ChildSpec("worker-1", "worker", "cardq.worker:main"), proc=_Process())
    child.current_job, child.job_started = 7, time.monotonic()  # the worker writes monotonic time in its slot
    sup.children["worker-1"] = child
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 400)  # NTP steps the wall clock 400 s forward
    sup._enforce_timeouts(time.monotonic())
    assert not child.proc.killed
    limit = sup.loaded.config.workers.job_timeout_s + sup.loaded.config.supervisor.timeout_grace_s
    sup._enforce_timeouts(child.job_started + limit + 1)  # a handler really past its timeout
    assert child.proc.killed and child.kill_reason == "timeout"


@pytest.fixture
def one_job(db, unlimited):
    submit(db, [NewJob(b"{}")], user_id="u", plan="free", configured=unlimited, now=T0)
    return db


def test_a_jump_forward_does_not_expire_the_leases_of_live_workers(one_job):
    db = one_job
    [held] = jobs.claim(db, "sup:worker-1.1", lease_s=30, now=T0)
    assert jobs.recover(db, processing_timeout_s=1800, live_owners=["sup:worker-1.1"], now=T0 + 400).total == 0
    assert jobs.complete_many(db, [(held.id, held.token, None)], now=T0 + 400) == []  # still held: it finishes


def test_an_expired_lease_of_a_dead_holder_is_still_recovered(one_job):
    db = one_job
    jobs.claim(db, "sup:worker-1.1", lease_s=30, now=T0)
    assert jobs.recover(db, processing_timeout_s=1800, live_owners=["sup:worker-2.1"], now=T0 + 400).total == 1


def test_a_jump_back_does_not_postpone_a_retry_in_backoff(one_job):
    db = one_job
    [held] = jobs.claim(db, "w", lease_s=30, now=T0)
    backoff = jobs.Backoff(base_s=60, max_s=300)
    out = jobs.fail(db, held.id, held.token, "upstream 503", backoff=backoff, rng=random.Random(1), now=T0)
    assert out.status == "scheduled" and T0 < out.run_at <= T0 + 300
    # The clock is set back a day: without a horizon the retry would wait a day; with it, it runs now.
    assert jobs.claim(db, "w", lease_s=30, now=T0 - DAY) == []
    [again] = jobs.claim(db, "w", lease_s=30, horizon_s=backoff.max_s + 1, now=T0 - DAY)
    assert again.id == held.id and again.attempt == 2


def test_a_jump_back_locks_a_rate_limited_key_out_for_one_window_at_most():
    p = Policy("*", limit=60, window_s=60.0, burst=60)
    tat = None
    for _ in range(60):  # the key spends its whole burst at T0
        answer, tat = gcra(tat, T0, 1, p)
        assert answer["allowed"]
    answer, tat = gcra(tat, T0 - DAY, 1, p)  # the clock is set back a day: the key is "full", no more
    assert not answer["allowed"] and answer["retry_after_s"] <= p.interval + 1e-6
    answer, _ = gcra(tat, T0 - DAY + p.interval, 1, p)  # and refills at its rate from there
    assert answer["allowed"]


def _gate_with_a_waiter(db, tmp_path):
    """A RateLimiter (in this process, on a real database) whose gate is full, with one caller queued."""
    config = tmp_path / "config.toml"
    config.write_text(f'[actors]\nrun_dir = "{tmp_path / "run"}"\n')
    loaded = load_config(config)
    rl = RateLimiter(loaded, db, 0)
    gate = loaded.config.gates["generation"]
    conn, _other = Pipe()
    peer = Peer(conn, os.getpid(), "test")
    for i in range(gate.max_concurrency):
        db.batch(lambda tx, i=i: rl.acquire(tx, peer, Acquire("generation", f"p{i}"), i))
    db.batch(lambda tx: rl.acquire(tx, peer, Acquire("generation", "waiting", wait_ms=5000), 99))
    assert [w.permit for w in rl.gates["generation"].waiters] == ["waiting"]
    return rl, (conn, _other)


@pytest.mark.parametrize("step", [400.0, -DAY])
def test_a_wall_clock_step_neither_expires_nor_prolongs_a_gate_wait(db, monkeypatch, step, tmp_path):
    rl, _pipes = _gate_with_a_waiter(db, tmp_path)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + step)
    answers = db.batch(lambda tx: rl.tick(tx, time.time()))
    assert not answers and [w.permit for w in rl.gates["generation"].waiters] == ["waiting"]  # still waiting
    # Its next deadline, in the wall time the server asks in, is its 5 s wait from now, not a day away.
    assert rl.next_tick(time.time()) - time.time() <= 5.0
    real_mono = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_mono() + 5.0)  # its 5 s have really passed
    answers = db.batch(lambda tx: rl.tick(tx, time.time()))
    assert [a[2]["code"] for a in answers] == ["overloaded"] and not rl.gates["generation"].waiters
    rl.gates["generation"].slots.close()  # its slot locks: this process holds them
