"""Concurrency gates shared by workers and apps: permits are slot locks (actors/gateslots.py) that workers and
apps take in their own processes, with the RateLimiter actor's queue for whoever finds none free. One limit for
all of them at once; a dead holder's permit comes back at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import cardq
from cardq.actors.gateslots import GateSlots

from conftest import wait_for
from supervision import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def peak(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end sorts first
    level = top = 0
    for _, step in events:
        level += step
        top = max(top, level)
    return top


def test_max_concurrency_holds_across_workers_and_apps_together(tmp_path: Path):
    # 3 workers run jobs that hold the gate 50 ms each, while 4 app threads take the same gate 10 times each;
    # every holder records the monotonic interval it spent inside. Never more than 2 inside at once.
    intervals = tmp_path / "intervals"
    d = Deployment(tmp_path, workers={"count": 3, "gate": "g"},
                   gates={"g": {"max_concurrency": 2, "max_queue": 64, "queue_timeout_ms": 60_000}})
    try:
        ids = d.submit([{"hold": 0.05, "intervals": str(intervals)}] * 40)
        d.start()
        d.wait_for_actor()
        q = cardq.connect(d.config_path, name="app")
        lock = threading.Lock()
        app_intervals: list[tuple[float, float]] = []

        def app() -> None:
            for _ in range(10):
                with q.gate("g"):
                    started = time.monotonic()
                    time.sleep(0.05)
                    ended = time.monotonic()
                with lock:
                    app_intervals.append((started, ended))

        threads = [threading.Thread(target=app) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(app_intervals) == 40
        assert all(j.status == "done" for j in q.wait(ids, timeout=120))
        worker_intervals = [tuple(map(float, line.split())) for line in intervals.read_text().splitlines()]
        assert len(worker_intervals) == 40
        everyone = app_intervals + worker_intervals
        assert peak(everyone) == 2  # reached, never passed
        assert peak(app_intervals) >= 1 and peak(worker_intervals) >= 1
        stats = q.gate_stats()["g"]
        assert stats["active"] == 0 and stats["max_concurrency"] == 2
        q.close()
    finally:
        d.close()


def test_a_slot_held_by_a_killed_process_is_free_at_once(tmp_path: Path):
    d = Deployment(tmp_path, workers={"count": 0}, gates={"g": {"max_concurrency": 1}})
    try:
        d.start()
        d.wait_for_actor()
        pid = os.fork()
        if pid == 0:  # a holder that is SIGKILLed inside its permit
            slots = GateSlots(d.loaded.run_dir, "g")
            slots.try_take(1)
            os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(0)
        wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 30,
                 what="the holder stopped, holding the slot")
        mine = GateSlots(d.loaded.run_dir, "g")
        assert mine.try_take(1) is None
        with cardq.connect(d.config_path) as q:
            assert q.gate_stats()["g"]["active"] == 1
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            assert mine.try_take(1) == 0  # the kernel gave it back with the process: no reaper to wait for
            mine.give(0)
            with q.gate("g"):
                assert q.gate_stats()["g"]["active"] == 1
        mine.close()
    finally:
        d.close()


def test_a_wait_at_the_gate_cut_short_leaves_no_permit_behind(tmp_path: Path):
    # Before: only a client-side ActorTimeout took the request out of the actor's queue; a wait cut short any
    # other way (the app's own deadline, ^C) left it there, the actor granted it later and held the slot for the
    # live app process — the gate's only slot, gone until that process exited.
    d = Deployment(tmp_path, workers={"count": 0},
                   gates={"one": {"max_concurrency": 1, "queue_timeout_ms": 60_000}})
    try:
        d.start()
        d.wait_for_actor()
        occupier = GateSlots(d.loaded.run_dir, "one")
        assert occupier.try_take(1) == 0
        q = cardq.connect(d.config_path)

        class Deadline(Exception):
            pass

        def cut(_signum: int, _frame: object) -> None:
            raise Deadline

        previous = signal.signal(signal.SIGALRM, cut)
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        try:
            with pytest.raises(Deadline), q.gate("one"):
                pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        # The cut-short request left the queue before gate() raised (its release is answered synchronously):
        # nothing waits that the actor could grant the slot to once it frees.
        stats = q.gate_stats()["one"]
        assert stats["queued"] == 0 and stats["active"] == 1  # the occupier alone
        occupier.give(0)
        occupier.close()
        with q.gate("one"):  # the slot is free for the next caller
            pass
        assert d.db.conn.execute("SELECT count(*) FROM gate_permits").fetchall()[0][0] == 0
        q.close()
    finally:
        d.close()


def test_a_config_edit_inside_a_gate_block_keeps_the_permit(tmp_path: Path):
    # Before: the first call after config.toml changed replaced the thread's client and closed its slot
    # descriptors — giving the permit back while the block still ran, so a second holder got in.
    d = Deployment(tmp_path, workers={"count": 0}, gates={"one": {"max_concurrency": 1}})
    try:
        d.start()
        d.wait_for_actor()
        q = cardq.connect(d.config_path)
        other = GateSlots(d.loaded.run_dir, "one")
        with q.gate("one"):
            d.write_config(log={"level": "warning"})  # any edit: a new digest, a new client for this thread
            with contextlib.suppress(cardq.Error):
                q.ratelimit.check("k", on_unavailable="allow")  # a call inside the block, after the edit
            assert other.try_take(1) is None  # still ours
        assert other.try_take(1) == 0  # and free once the block is over
        other.close()
        q.close()
    finally:
        d.close()


def test_the_supervisor_never_blocks_on_a_worker_waiting_at_a_full_gate(tmp_path: Path):
    # Before: a worker that had claimed a job and waited in the gate's queue still looked idle; every submit made
    # the supervisor send it a wake-up it did not read, until the supervisor blocked in send() — deaf to
    # SIGTERM, timeouts and restarts until the gate freed.
    d = Deployment(tmp_path, workers={"count": 1, "gate": "one"},
                   gates={"one": {"max_concurrency": 1, "queue_timeout_ms": 120_000}})
    try:
        proc = d.start()
        d.wait_for_actor()
        occupier = GateSlots(d.loaded.run_dir, "one")
        assert occupier.try_take(1) == 0
        with cardq.connect(d.config_path, name="app") as q:
            [first] = q.submit([{}], user="u1", plan="enterprise").ids
            wait_for(lambda: q.gate_stats()["one"]["queued"] == 1, 60, what="the worker queued at the gate")
            for _ in range(400):  # 400 rings while it waits
                q.submit([{}], user="u1", plan="enterprise")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any(e["event"] == "supervisor.stopping" for e in d.log_lines()), 30,
                 what="the supervisor acting on SIGTERM while the gate is still taken")
        occupier.give(0)
        occupier.close()
        assert proc.wait(60) == 0
        assert d.job(first)["status"] in ("done", "queued")  # run, or given back untouched at the stop
    finally:
        d.close()
