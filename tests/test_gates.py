"""Concurrency gates shared by workers and apps: permits are slot locks (actors/gateslots.py) that workers and
apps take in their own processes, with the RateLimiter actor's queue for whoever finds none free. One limit for
all of them at once; a dead holder's permit comes back at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import cardq
from cardq.actors.gateslots import GateSlots
from cardq.actors.protocol import socket_path

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
        wait_for(lambda: socket_path(d.loaded.run_dir, "ratelimit", 0).exists(), 60, what="the rate limiter")
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
        wait_for(lambda: socket_path(d.loaded.run_dir, "ratelimit", 0).exists(), 60, what="the rate limiter")
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
