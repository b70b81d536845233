"""Several submits in one transaction (store.submit.submit_many, Queue.submit_many — what the HTTP server's grouped
submits use): each all or nothing on its own, in order, each seeing the ones before it, exactly as the same
submits one after another would be."""

from __future__ import annotations

import orjson
import pytest

import cardq
from cardq.errors import InputError
from cardq.store import LimitExceeded
from cardq.store.submit import NewJob, SubmitRequest, SubmitResult, submit_many

T0 = 1_795_000_000.0


def items(n: int) -> list[NewJob]:
    return [NewJob(orjson.dumps({"i": i})) for i in range(n)]


def test_one_refused_leaves_the_others_and_each_sees_the_ones_before(db, configured):
    out = submit_many(db, [
        SubmitRequest(items(200), "a", "enterprise"),
        SubmitRequest(items(101), "a", "enterprise"),  # 200 + 101 would pass batch_max_queued_per_user (300)
        SubmitRequest(items(100), "a", "enterprise"),  # 200 + 100: exactly at it
        SubmitRequest(items(1), "b", "nope"),  # refused before the transaction
        SubmitRequest(items(5), "b", "enterprise"),
        SubmitRequest(items(6), "f", "free"),  # over the free plan's 5 a day
    ], configured=configured, now=T0)
    assert [type(r) for r in out] == [SubmitResult, LimitExceeded, SubmitResult, InputError, SubmitResult,
                                      LimitExceeded]
    assert "user a has 200 jobs queued or processing" in str(out[1])
    assert "unknown plan 'nope'" in str(out[3])
    ids = out[0].ids + out[2].ids + out[4].ids
    assert ids == list(range(ids[0], ids[0] + 305))  # in order; the refused ones took no id
    rows = dict(db.conn.execute("SELECT user_id, count(*) FROM jobs GROUP BY user_id").fetchall())
    assert rows == {"a": 300, "b": 5}
    # the durable totals count them as submit() one by one would: the jobs made, and each limit's refusal
    refused = dict(db.conn.execute("SELECT limit_key, n FROM limit_rejections").fetchall())
    assert refused == {"batch_max_queued_per_user": 1, "daily.free": 1}
    assert db.conn.execute("SELECT sum(n) FROM job_totals WHERE event = 'submitted'").fetchall()[0][0] == 305


def test_a_group_with_nothing_to_commit(db, configured):
    assert submit_many(db, [], configured=configured) == []
    [refused] = submit_many(db, [SubmitRequest([], "a", "enterprise")], configured=configured)
    assert isinstance(refused, InputError)


@pytest.fixture
def q(tmp_path):
    cardq.init(tmp_path / "config.toml")
    with cardq.connect(tmp_path / "config.toml", name="test") as queue:
        yield queue


def test_queue_submit_many_answers_as_submits_one_by_one(q):
    out = q.submit_many([
        {"items": [{"sku": "1"}, {"sku": "2"}], "user": "u", "plan": "enterprise", "idempotency_key_field": "sku"},
        {"items": [{"sku": "2"}, {"sku": "3"}], "user": "u", "plan": "enterprise", "idempotency_key_field": "sku",
         "kind": "thumb", "priority": 3},
        {"items": ["not an object"], "user": "u", "plan": "enterprise"},
        {"items": [{"x": 1}] * 201, "user": "v", "plan": "enterprise"},
    ])
    first, second, bad, big = out
    assert (first.created, first.existing) == (2, 0)
    assert (second.created, second.existing) == (1, 1) and second.ids[0] == first.ids[1]  # the key known: its job
    assert isinstance(bad, InputError) and "item 0" in str(bad)
    assert isinstance(big, LimitExceeded) and big.limit == "batch_max_items_per_request"
    job = q.job(second.ids[1])
    assert (job.kind, job.priority, job.payload) == ("thumb", 3, {"sku": "3"})
    assert q.pending() == 3
