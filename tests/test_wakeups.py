"""When the supervisor wakes idle workers (cardq/wakeups.py): at a ring, or when a job in backoff becomes due — and
with nothing in backoff, it may sleep until the next look-up, not wake every second."""

from __future__ import annotations

import time

import orjson

from cardq.store import jobs
from cardq.store.submit import NewJob, submit
from cardq.wakeups import DUE_REFRESH_S, Wakeups


def test_with_nothing_in_backoff_the_supervisor_may_sleep_until_the_next_look_up(db):
    w = Wakeups(db)
    assert w.due() is True  # at start: look once
    assert w.due() is False
    # The bug this guards: "no job in backoff" (None) was taken for "the one already woken for" (None) and looked
    # up again every second, so an idle supervisor never slept longer than 1 s.
    assert w.seconds_to_next() > DUE_REFRESH_S - 5


def test_a_job_in_backoff_is_woken_for_once_when_due(db, unlimited):
    now = time.time()
    [jid] = submit(db, [NewJob(orjson.dumps({"n": 1}))], user_id="u", plan="enterprise", configured=unlimited,
                   now=now).ids
    [held] = jobs.claim(db, "w", lease_s=30, now=now)
    jobs.fail(db, jid, held.token, "boom", backoff=jobs.Backoff(0.0, 0.0), not_before_s=2.0, now=now)
    w = Wakeups(db)
    assert w.due(now) is True  # the start's look
    assert 1.0 < w.seconds_to_next(now) <= 2.01  # asleep until it is due
    assert w.due(now + 1.0) is False
    assert w.due(now + 2.5) is True
    assert w.due(now + 2.6) is False  # woken for once, not at every step until a worker claims it
