"""Adaptive gates (actors/gatelimit.py): the AIMD rules on their own, the shared limit file across real
processes, and a real supervisor's workers finding the capacity of a real HTTP upstream that answers 503 past it."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import threading
import time
from pathlib import Path

import orjson
import pytest
from fake_upstream import FakeUpstream
from hypothesis import given, settings
from hypothesis import strategies as st

import cardq
from cardq.actors.gatelimit import BACKOFF, LATENCY_MIN_SAMPLES, AdaptiveLimit, State, effective, outcome_of, step
from cardq.actors.gateslots import GateSlots
from cardq.generate import UpstreamError
from cardq.handlers import RetryAfter

from conftest import wait_for
from supervision import Deployment

ITEM = {"title": "Wireless earbuds", "description": "Bluetooth 5.3", "marketplace": "ozon", "style": "selling"}


def run(s: State, outcomes: list[str], lo: int = 1, hi: int = 16, latency_ms: float = 100.0) -> State:
    """Each outcome from a call that started just now (after any earlier cut)."""
    t = s.cut_at
    for o in outcomes:
        t += 1.0
        s, _ = step(s, lo, hi, t, t + 0.5, o, latency_ms)
    return s


def test_a_fresh_gate_starts_at_min_and_doubles_per_round_until_the_first_drop():
    s = run(State(), ["ok"])  # limit 0 = never set: min_concurrency, then +1 per success
    assert effective(s.limit, 1, 16) == 2
    s = run(s, ["ok"] * 6)
    assert effective(s.limit, 1, 16) == 8
    s = run(s, ["drop"])
    assert s.limit == 8 * BACKOFF and s.cut_once
    before = s.limit
    s = run(s, ["ok"] * 6)  # after the first drop: +1/limit per success, about one permit per round
    assert before + 0.9 < s.limit < before + 1.0


def test_the_limit_stays_within_min_and_max():
    s = run(State(), ["ok"] * 100, lo=2, hi=5)
    assert s.limit == 5.0
    s = run(s, ["drop"] * 20, lo=2, hi=5)
    assert s.limit == 2.0
    assert effective(9.7, 2, 5) == 5 and effective(0.0, 2, 5) == 2 and effective(math.nan, 2, 5) == 2
    assert effective(math.inf, 2, 5) == 5 and effective(-math.inf, 2, 5) == 2


def test_calls_in_flight_at_a_cut_do_not_cut_again():
    """Sixteen calls fail together when the upstream first pushes back: one cut, not sixteen."""
    s = run(State(), ["ok"] * 15)  # slow start to 16
    first, why = step(s, 1, 16, 100.0, 101.0, "drop", 300.0)
    assert first.limit == 12.0 and why == "upstream overloaded"
    s = first
    for _ in range(15):  # the others, started at 100.0, before the cut at 101.0
        s, why = step(s, 1, 16, 100.0, 101.2, "drop", 300.0)
        assert why is None
    assert s.limit == 12.0
    s, why = step(s, 1, 16, 102.0, 102.5, "drop", 300.0)  # a call started after the cut: it counts
    assert s.limit == 9.0 and why == "upstream overloaded"


def test_a_cut_time_from_before_a_reboot_does_not_silence_the_gate():
    """cut_at is monotonic, and the state file outlives a reboot, after which the clock starts near zero."""
    s = State(limit=12.0, cut_at=30 * 86400.0, cut_once=1.0)  # cut 30 days into the last boot
    s, why = step(s, 1, 16, 100.0, 100.5, "drop", 300.0)  # 100 s into this boot
    assert why == "upstream overloaded" and s.limit == 9.0 and s.cut_at == 100.5


def test_a_sustained_rise_in_latency_cuts_like_an_overload():
    s = run(State(), ["ok"] * LATENCY_MIN_SAMPLES, hi=100, latency_ms=300.0)
    high = s.limit
    s, why = step(s, 1, 100, s.cut_at + 1, s.cut_at + 2, "ok", 2000.0)  # one slow call among quick ones: noise
    assert why == "healthy" and s.limit > high
    high = s.limit
    t, cuts = s.cut_at + 10, []
    for _ in range(30):  # a run of calls at 3x the usual
        t += 1
        before = s.limit
        s, why = step(s, 1, 100, t, t + 0.5, "ok", 900.0)
        if why != "healthy":
            cuts.append((why, before, s.limit))
    # Each cut needs fresh evidence (the recent average starts again from the usual): a few cuts, not thirty.
    assert 1 <= len(cuts) <= 3, cuts
    assert all(why.startswith("latency") and after == before * BACKOFF for why, before, after in cuts), cuts


def test_latency_is_judged_only_once_it_means_something():
    s = run(State(), ["ok"] * 3, latency_ms=300.0)  # too few samples
    s, why = step(s, 1, 16, 10.0, 11.0, "ok", 30_000.0)
    assert why == "healthy"
    s = run(State(), ["ok"] * 40, hi=100, latency_ms=0.01)  # microseconds: a rise to 100x is no upstream in trouble
    before = s.limit
    s = run(s, ["ok"] * 40, hi=100, latency_ms=1.0)
    assert s.limit > before and not s.cuts


def test_failures_that_are_not_the_upstreams_load_change_nothing():
    s = run(State(), ["ok"] * 5)
    assert run(s, ["ignore"] * 10) == s
    assert outcome_of(None) == "ok"
    assert outcome_of(RetryAfter(5, "429")) == "drop" and outcome_of(TimeoutError()) == "drop"
    assert outcome_of(UpstreamError("upstream 503: busy", overload=True)) == "drop"
    assert outcome_of(UpstreamError("upstream 500: bug")) == "ignore" and outcome_of(ValueError()) == "ignore"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 50), st.integers(0, 50), st.lists(st.tuples(
    st.sampled_from(["ok", "drop", "ignore"]), st.floats(0, 1e6), st.floats(-5, 5)), max_size=80))
def test_any_sequence_keeps_the_limit_in_range(lo, extra, events):
    hi = lo + extra
    s, t = State(), 0.0
    for outcome, latency, started_offset in events:
        t += 1.0
        s, _ = step(s, lo, hi, t + started_offset, t, outcome, latency)
        assert lo <= s.limit <= hi


def test_a_probe_that_fails_gives_the_slot_back(tmp_path: Path):
    """Taking a slot of a cut adaptive gate opens the files above the limit to count their holders; if that
    fails, the slot just taken must not stay held by nobody."""
    slots, other = GateSlots(tmp_path, "g"), GateSlots(tmp_path, "g")
    (slots.dir / "g.2").mkdir(parents=True)  # slot 2's "file" cannot be opened for writing: the probe fails
    with pytest.raises(IsADirectoryError):
        slots.try_take(2, files=4)  # slot 0 is taken; the probe of slot 2 raises
    assert slots.held == set() and other.try_take(1) == 0
    slots.close()
    other.close()


def _record_oks(path: str, n: int) -> None:
    limit = AdaptiveLimit(Path(path))
    for _ in range(n):
        limit.record(1, 100_000, time.monotonic(), "ok", 1.0)


@pytest.mark.timeout(120)
def test_processes_share_one_limit_and_lose_no_update(tmp_path: Path):
    """Slow start adds exactly 1 per success: 4 processes x 300 successes under the file's lock = 1 + 1200."""
    path = tmp_path / "gates" / "g.limit"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_oks, args=(str(path), 300)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    mine = AdaptiveLimit(path)
    assert mine.read().limit == 1201 and mine.current(1, 100_000) == 1201 and mine.current(1, 50) == 50
    mine.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_workers_find_the_upstreams_capacity_and_stop_overloading_it(tmp_path: Path):
    """8 workers, an adaptive gate of 1..8, an upstream that serves 3 at once and answers 503 past that. A fixed
    gate of 8 would have 5 of every 8 calls refused; the adaptive one settles near 3 and says so in the log."""
    upstream = FakeUpstream(capacity=3, service_s=0.15)
    d = Deployment(tmp_path, workers={"count": 8, "handler": "cardq.cards:generate", "gate": "generation",
                                      "max_attempts": 50, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
                   gates={"generation": {"adaptive": True, "min_concurrency": 1, "max_concurrency": 8,
                                         "max_queue": 64, "queue_timeout_ms": 60_000}},
                   upstream={"base_url": upstream.base_url, "model": "fake-model"})
    try:
        ids = d.submit([ITEM] * 45)
        d.start()
        wait_for(lambda: d.statuses(ids).get("done") == 45, 180, what="45 cards made")
        assert upstream.rejected < upstream.served / 2, (upstream.rejected, upstream.served)
        changes = [line for line in d.log_lines() if line.get("event") == "gate.limit_changed"]
        cuts = [c for c in changes if c["new"] < c["old"]]
        assert cuts and all(c["gate"] == "generation" for c in changes), changes
        assert any(c["why"] == "upstream overloaded" and "503" in c["error"] for c in cuts), cuts
        shown = d.cardq("diag", "gates", "--json", check=True)
        gate = orjson.loads(shown.stdout)["generation"]
        assert gate["adaptive"] is True and 1 <= gate["limit"] < 8 and gate["limit_cuts"] >= 1, gate
        table = d.cardq("diag", "gates", check=True).stdout
        assert f"{gate['limit']} (1-8, adaptive)" in table
    finally:
        d.close()
        upstream.close()


@pytest.mark.timeout(120)
def test_threads_that_end_leave_no_descriptor_of_an_adaptive_gate_behind(tmp_path: Path):
    """A thread-per-request app: each thread's client is dropped with its thread, unclosed. Its handles on the
    gate's slot files and on its shared limit must close with it."""
    d = Deployment(tmp_path, workers={"count": 0},
                   gates={"up": {"adaptive": True, "min_concurrency": 1, "max_concurrency": 4}})
    try:
        d.start()  # (only for the key file: the fast path needs no actor)
        d.wait_for_actor()
        q = cardq.connect(d.config_path)

        def limit_files() -> int:
            return sum(1 for fd in os.listdir("/proc/self/fd")
                       if os.path.realpath(f"/proc/self/fd/{fd}").endswith(".limit"))

        def one_call() -> None:
            with q.gate("up"):
                pass

        for _ in range(30):
            t = threading.Thread(target=one_call)
            t.start()
            t.join()
        gc.collect()
        assert limit_files() <= 1, limit_files()
        q.close()
    finally:
        d.close()
