"""The restart policy, stepped with a fake spawner and made-up times: no processes, no clock."""

from __future__ import annotations

import pytest

from cardq.errors import RestartIntensityExceeded
from cardq.restarts import RestartPolicy


def policy(**kw) -> tuple[RestartPolicy, list[tuple[float, str]]]:
    spawned: list[tuple[float, str]] = []
    now = [0.0]
    p = RestartPolicy(lambda name: spawned.append((now[0], name)), **{
        "max_restarts": 3, "max_seconds": 10.0, "backoff_max_s": 5.0, **kw})
    p.clock = now  # the test moves now[0]; step() is always given the same value
    return p, spawned


def step(p: RestartPolicy, t: float) -> list[str]:
    p.clock[0] = t
    return p.step(t)


def test_new_children_start_at_the_next_step_and_are_not_restarts():
    p, spawned = policy()
    p.start("worker-1", 0.0)
    p.start("worker-2", 0.0)
    assert step(p, 0.0) == ["worker-1", "worker-2"]
    assert p.restarts_in_window == 0 and step(p, 1.0) == []


def test_restart_delay_doubles_up_to_the_cap_and_never_starts_early():
    p, spawned = policy(max_restarts=100, backoff_max_s=0.5)
    delays = [p.exited("worker-1", t, "killed by SIGKILL") for t in (0.0, 0.0, 0.0, 0.0, 0.0)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert step(p, 0.49) == []  # the last exit set the due time: 0.5 s after it
    assert step(p, 0.5) == ["worker-1"] and spawned == [(0.5, "worker-1")]


def test_intensity_counts_restarts_within_the_window_only():
    p, _ = policy(max_restarts=3, max_seconds=10.0)
    for t in (0.0, 1.0, 2.0):
        p.exited("w", t)
    # 11 s later the first three have left the window: three more are fine.
    for t in (13.0, 13.5, 14.0):
        p.exited("w", t)
    with pytest.raises(RestartIntensityExceeded, match=r"4 restarts within 10s \(max_restarts=3\); last: w boom"):
        p.exited("w", 14.5, "boom")


def test_intensity_exceeded_schedules_nothing():
    p, spawned = policy(max_restarts=1)
    p.exited("a", 0.0)
    step(p, 1.0)
    with pytest.raises(RestartIntensityExceeded):
        p.exited("b", 1.0)
    assert not p.pending("b") and step(p, 100.0) == [] and spawned == [(1.0, "a")]


def test_a_cancelled_child_is_not_started():
    p, spawned = policy()
    p.exited("worker-3", 0.0)
    p.cancel("worker-3")  # scaled away while waiting for its restart
    assert step(p, 10.0) == [] and spawned == []


def test_configure_applies_new_limits_and_keeps_the_count():
    p, _ = policy(max_restarts=10, backoff_max_s=5.0)
    p.exited("w", 0.0)
    p.exited("w", 0.0)
    p.configure(max_restarts=2, max_seconds=10.0, backoff_max_s=0.05)
    assert p.restarts_in_window == 2
    with pytest.raises(RestartIntensityExceeded):
        p.exited("w", 0.1)


def test_children_due_together_start_in_due_order():
    p, spawned = policy(max_restarts=100)
    p.exited("late", 0.0)  # due at 0.1
    p.exited("later", 0.0)  # due at 0.2
    p.start("new", 0.05)
    assert step(p, 1.0) == ["new", "late", "later"]
