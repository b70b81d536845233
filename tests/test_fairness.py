"""Fair share across users (store/fairness.py): the old CardMaker's global FIFO made a small user wait behind
a big batch; cardq interleaves."""

from __future__ import annotations

import orjson

from cardq.store import jobs
from cardq.store.submit import NewJob, submit

T0 = 1_800_000_000.0


def add(db, configured, user, n, priority=0, now=T0):
    items = [NewJob(orjson.dumps({"i": i})) for i in range(n)]
    return submit(db, items, user_id=user, plan="enterprise", priority=priority, configured=configured,
                  now=now).ids


def claim_order(db, n, now=T0):
    out = []
    for _ in range(n):
        got = jobs.claim(db, "w", lease_s=60, now=now)
        if not got:
            break
        out.append(got[0])
    return out


def test_small_user_is_not_stuck_behind_a_big_batch(db, unlimited):
    """The issue's scenario: A submits 300, then B submits 5; B's 5 are all claimed within the first 15."""
    add(db, unlimited, "A", 300)
    b_ids = set(add(db, unlimited, "B", 5))
    first15 = claim_order(db, 15)
    assert b_ids <= {j.id for j in first15}


def test_late_joiner_interleaves_with_the_remaining_backlog(db, unlimited):
    add(db, unlimited, "A", 300)
    assert {j.user_id for j in claim_order(db, 100)} == {"A"}
    b_ids = add(db, unlimited, "B", 5)
    users = [j.user_id for j in claim_order(db, 10)]
    assert users.count("B") == 5 and users[:2] in (["A", "B"], ["B", "A"])
    assert b_ids  # B's jobs were really submitted


def test_three_parallel_batches_are_served_round_robin(db, unlimited):
    """Seed 001, scenario 2: three users' batches of 50 are processed interleaved, not one after another."""
    for user in ("u1", "u2", "u3"):
        add(db, unlimited, user, 50)
    order = [j.user_id for j in claim_order(db, 150)]
    assert len(order) == 150
    for start in range(0, 150, 3):
        assert sorted(order[start:start + 3]) == ["u1", "u2", "u3"], order[start:start + 3]


def test_each_users_jobs_keep_their_submission_order(db, unlimited):
    a = add(db, unlimited, "A", 20)
    b = add(db, unlimited, "B", 20)
    order = claim_order(db, 40)
    assert [j.id for j in order if j.user_id == "A"] == a
    assert [j.id for j in order if j.user_id == "B"] == b


def test_priority_wins_over_fairness(db, unlimited):
    add(db, unlimited, "A", 10)
    urgent = add(db, unlimited, "A", 3, priority=9)
    add(db, unlimited, "B", 10)
    assert [j.id for j in claim_order(db, 3)] == urgent


def test_idle_user_gains_no_credit(db, unlimited):
    """B was served long ago; when B comes back with a big batch it does not jump ahead of A's queue."""
    add(db, unlimited, "B", 5)
    claim_order(db, 5)
    add(db, unlimited, "A", 50)
    claim_order(db, 25)
    add(db, unlimited, "B", 50)
    users = [j.user_id for j in claim_order(db, 20)]
    assert 9 <= users.count("A") <= 11, users


def test_user_with_backlog_continues_after_it(db, unlimited):
    """A user adding a second batch while the first is still queued queues behind their own first batch."""
    a1 = add(db, unlimited, "A", 10)
    add(db, unlimited, "B", 10)
    a2 = add(db, unlimited, "A", 10)
    order = [j.id for j in claim_order(db, 30)]
    assert max(order.index(i) for i in a1) < min(order.index(i) for i in a2)
    assert order[-10:] == a2  # B's ten were interleaved with A's first ten
