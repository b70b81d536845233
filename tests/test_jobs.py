"""The job state machine, step by step with an injected clock: claim, lease fencing, retry with backoff,
dead-letter, recover, and the operator actions."""

from __future__ import annotations

import random

import orjson
import pytest

from cardq.errors import InputError
from cardq.store import InvalidTransition, JobNotFound, LeaseLost, admin, counters, jobs, queries
from cardq.store.db import Tx
from cardq.store.submit import NewJob, submit

T0 = 1_800_000_000.0  # a fixed "now"; every call below passes its own time
BACKOFF = jobs.Backoff(base_s=2.0, max_s=60.0)


def add(db, configured, n=1, user="u1", plan="enterprise", priority=0, max_attempts=3, now=T0, **kw):
    items = [NewJob(orjson.dumps({"n": i})) for i in range(n)]
    return submit(db, items, user_id=user, plan=plan, priority=priority, max_attempts=max_attempts,
                  configured=configured, now=now, **kw).ids


def row(db, job_id):
    return queries.get(db, job_id)


def test_claim_complete_happy_path(db, configured):
    [jid] = add(db, configured)
    [job] = jobs.claim(db, "w1", lease_s=30, now=T0 + 1)
    assert (job.id, job.attempt, job.user_id, orjson.loads(job.payload)) == (jid, 1, "u1", {"n": 0})
    assert job.lease_until == T0 + 31
    r = row(db, jid)
    assert (r["status"], r["lease_owner"], r["started_at"]) == ("processing", "w1", T0 + 1)
    jobs.complete(db, jid, job.token, {"card": "ok"}, now=T0 + 2)
    r = row(db, jid)
    assert (r["status"], r["result"], r["finished_at"], r["lease_owner"]) == ("done", {"card": "ok"}, T0 + 2, None)
    assert jobs.claim(db, "w1", lease_s=30, now=T0 + 3) == []


def test_claim_k_returns_jobs_in_claim_order(db, configured):
    ids = add(db, configured, n=5)
    got = jobs.claim(db, "w1", k=3, lease_s=30, now=T0)
    assert [j.id for j in got] == ids[:3]
    assert len({j.token for j in got}) == 1
    assert [j.id for j in jobs.claim(db, "w2", k=10, lease_s=30, now=T0)] == ids[3:]


def test_priority_wins(db, configured):
    low = add(db, configured, n=3, user="a")
    [high] = add(db, configured, user="b", priority=5)
    assert jobs.claim(db, "w", lease_s=30, now=T0)[0].id == high
    assert [j.id for j in jobs.claim(db, "w", k=3, lease_s=30, now=T0)] == low


def test_stale_holder_cannot_complete_or_fail_after_reclaim(db, configured):
    [jid] = add(db, configured)
    [first] = jobs.claim(db, "w1", lease_s=10, now=T0)
    assert jobs.recover(db, processing_timeout_s=1800, now=T0 + 11).requeued == 1
    [second] = jobs.claim(db, "w2", lease_s=10, now=T0 + 12)
    assert second.id == jid and second.token != first.token and second.attempt == 2
    with pytest.raises(LeaseLost, match=f"job {jid}: lease lost"):
        jobs.complete(db, jid, first.token, "late", now=T0 + 13)
    with pytest.raises(LeaseLost):
        jobs.fail(db, jid, first.token, "late", backoff=BACKOFF, now=T0 + 13)
    r = row(db, jid)
    assert (r["status"], r["lease_owner"], r["result"]) == ("processing", "w2", None)
    jobs.complete(db, jid, second.token, "ok", now=T0 + 14)
    assert row(db, jid)["result"] == "ok"
    with pytest.raises(LeaseLost):  # completing twice is refused, the first result stands
        jobs.complete(db, jid, second.token, "again", now=T0 + 15)
    assert row(db, jid)["result"] == "ok"


def test_expired_but_not_reclaimed_lease_may_still_complete(db, configured):
    [jid] = add(db, configured)
    [job] = jobs.claim(db, "w1", lease_s=1, now=T0)
    jobs.complete(db, jid, job.token, 1, now=T0 + 100)
    assert row(db, jid)["status"] == "done"


def test_fail_retries_with_backoff_then_dead(db, configured):
    [jid] = add(db, configured, max_attempts=3)
    rng = random.Random(7)
    now = T0
    for attempt in (1, 2):
        [job] = jobs.claim(db, "w", lease_s=30, now=now)
        assert job.attempt == attempt
        out = jobs.fail(db, jid, job.token, f"boom {attempt}", backoff=BACKOFF, rng=rng, now=now)
        cap = min(BACKOFF.max_s, BACKOFF.base_s * 2 ** (attempt - 1))
        assert out.status in ("scheduled", "queued") and now <= out.run_at <= now + cap
        if out.run_at > now:  # not runnable before run_at
            assert jobs.claim(db, "w", lease_s=30, now=out.run_at - 0.001) == []
        now = out.run_at
    [job] = jobs.claim(db, "w", lease_s=30, now=now)
    out = jobs.fail(db, jid, job.token, "boom 3", backoff=BACKOFF, rng=rng, now=now)
    assert out.status == "dead"
    r = row(db, jid)
    assert (r["status"], r["last_error"], r["attempts"]) == ("dead", "boom 3", 3)
    assert [e["error"] for e in r["errors"]] == ["boom 1", "boom 2", "boom 3"]
    assert [e["attempt"] for e in r["errors"]] == [1, 2, 3]


def test_backoff_is_exponential_capped_full_jitter():
    b = jobs.Backoff(base_s=1.0, max_s=10.0)
    rng = random.Random(1)
    for attempt, cap in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (50, 10)):
        samples = [b.delay(attempt, rng) for _ in range(2000)]
        assert min(samples) >= 0 and max(samples) <= cap
        assert max(samples) > 0.9 * cap and min(samples) < 0.1 * cap  # full jitter spans the whole range


def test_permanent_failure_is_dead_at_once(db, configured):
    [jid] = add(db, configured, max_attempts=5)
    [job] = jobs.claim(db, "w", lease_s=30, now=T0)
    assert jobs.fail(db, jid, job.token, "missing description", permanent=True, backoff=BACKOFF,
                     now=T0).status == "dead"
    assert row(db, jid)["attempts"] == 1


def test_error_history_is_bounded(db, configured):
    [jid] = add(db, configured, max_attempts=100)
    for i in range(jobs.ERROR_HISTORY_MAX + 5):
        [job] = jobs.claim(db, "w", lease_s=30, now=T0 + i)
        jobs.fail(db, jid, job.token, "x" * 2000, backoff=jobs.Backoff(0, 0), now=T0 + i)
    r = row(db, jid)
    assert len(r["errors"]) == jobs.ERROR_HISTORY_MAX
    assert r["errors"][-1]["attempt"] == jobs.ERROR_HISTORY_MAX + 5
    assert len(r["last_error"]) == jobs.ERROR_TEXT_MAX


def test_recover_requeues_expired_and_kills_last_attempt(db, configured):
    a, b = add(db, configured, n=2, max_attempts=1)
    [c] = add(db, configured, user="u2", max_attempts=3)
    jobs.claim(db, "w", k=3, lease_s=10, now=T0)
    assert jobs.recover(db, processing_timeout_s=1800, now=T0 + 5).total == 0  # not expired yet
    got = jobs.recover(db, processing_timeout_s=1800, now=T0 + 11)
    assert (got.requeued, got.dead) == (1, 2)
    assert row(db, a)["status"] == row(db, b)["status"] == "dead"
    r = row(db, c)
    assert r["status"] == "queued" and "lease expired" in r["last_error"]


def test_extend_keeps_a_lease_alive_and_recover_backstop_catches_hung_jobs(db, configured):
    [jid] = add(db, configured)
    [job] = jobs.claim(db, "w", lease_s=10, now=T0)
    for t in range(5, 100, 5):
        assert jobs.extend(db, [(jid, job.token)], lease_s=10, now=T0 + t) == {jid}
        assert jobs.recover(db, processing_timeout_s=1800, now=T0 + t + 1).total == 0
    # The lease is fresh, but the job has been processing past job_processing_timeout_seconds.
    got = jobs.recover(db, processing_timeout_s=60, now=T0 + 96)
    assert got.requeued == 1
    assert "job_processing_timeout_seconds=60" in row(db, jid)["last_error"]
    assert jobs.extend(db, [(jid, job.token)], lease_s=10, now=T0 + 97) == set()


def test_cancel(db, configured):
    a, b, c = add(db, configured, n=3)
    [held] = jobs.claim(db, "w", lease_s=30, now=T0)
    assert admin.cancel(db, a, now=T0) == "processing"
    with pytest.raises(LeaseLost):
        jobs.complete(db, a, held.token, "too late", now=T0)
    assert admin.cancel(db, b, now=T0) == "queued"
    with pytest.raises(InvalidTransition, match=f"job {b} is cancelled"):
        admin.cancel(db, b, now=T0)
    with pytest.raises(JobNotFound):
        admin.cancel(db, 999, now=T0)
    assert [j.id for j in jobs.claim(db, "w", k=5, lease_s=30, now=T0)] == [c]


def test_operator_retry_of_dead_jobs(db, configured):
    ids = add(db, configured, n=3, max_attempts=1)
    for job in jobs.claim(db, "w", k=3, lease_s=30, now=T0):
        jobs.fail(db, job.id, job.token, "upstream 500", backoff=BACKOFF, now=T0)
    assert {row(db, i)["status"] for i in ids} == {"dead"}
    assert admin.retry(db, ids[0], now=T0 + 1) == [ids[0]]
    r = row(db, ids[0])
    assert (r["status"], r["attempts"], r["last_error"]) == ("queued", 0, "upstream 500")
    with pytest.raises(InvalidTransition, match="only dead, cancelled, scheduled"):
        admin.retry(db, ids[0], now=T0 + 1)
    assert sorted(admin.retry(db, status="dead", user_id="u1", now=T0 + 2)) == ids[1:]
    assert admin.retry(db, status="dead", user_id="nobody", now=T0 + 2) == []
    assert len(jobs.claim(db, "w", k=10, lease_s=30, now=T0 + 3)) == 3


def test_purge_only_old_finished_jobs(db, configured):
    old, new, queued = add(db, configured, n=3)
    for jid, t in ((old, T0), (new, T0 + 86400 * 6)):
        [job] = jobs.claim(db, "w", lease_s=30, now=t)
        assert job.id == jid
        jobs.complete(db, jid, job.token, None, now=t)
    assert admin.purge(db, older_than_s=7 * 86400, now=T0 + 86400 * 8) == 1
    with pytest.raises(JobNotFound):
        row(db, old)
    assert row(db, new)["status"] == "done" and row(db, queued)["status"] == "queued"
    # ids are never reused after a purge
    assert add(db, configured, now=T0 + 86400 * 8) == [queued + 1]


def test_idempotency_key_returns_existing_job(db, configured):
    items = [NewJob(b'{"sku":"A"}', "A"), NewJob(b'{"sku":"B"}', "B"), NewJob(b'{"sku":"A"}', "A")]
    first = submit(db, items, user_id="u1", plan="enterprise", configured=configured, now=T0)
    assert (first.created, first.existing) == (2, 1)
    assert first.ids[0] == first.ids[2] != first.ids[1]
    again = submit(db, items[:2] + [NewJob(b'{"sku":"C"}', "C")], user_id="u1", plan="enterprise",
                   configured=configured, now=T0)
    assert again.ids[:2] == first.ids[:2] and again.created == 1
    other_user = submit(db, items[:1], user_id="u2", plan="enterprise", configured=configured, now=T0)
    assert other_user.created == 1  # keys are per user


def _tokens_of(db, key: str) -> int:
    return db.read(lambda c: counters.get(Tx(c), key, day="-"))


def test_upstream_tokens_are_counted_per_user_per_day_once_when_done(db, configured):
    """A result's _meta.usage.total_tokens (the card generator's) goes to tokens:<user>:<day> in the completion's
    own transaction: a lost lease adds nothing, other results add nothing, the local day is the key's."""
    a1, a2 = add(db, configured, n=2, user="alice")
    [b1] = add(db, configured, user="bob")
    claimed = {j.id: j for j in jobs.claim(db, "w", k=3, lease_s=30, now=T0)}
    meta = {"_meta": {"usage": {"prompt_tokens": 40, "completion_tokens": 60, "total_tokens": 100}}}
    lost = jobs.complete_many(db, [(a1, claimed[a1].token, {"title": "x", **meta}),
                                   (a2, claimed[a2].token + 1, meta),  # not its lease: not counted
                                   (b1, claimed[b1].token, {"_meta": {"usage": {"total_tokens": "many"}}})],
                              now=T0 + 1)
    assert lost == [a2]
    day = db.days.key(T0 + 1)
    assert _tokens_of(db, f"tokens:alice:{day}") == 100 and _tokens_of(db, f"tokens:bob:{day}") == 0
    jobs.complete(db, a2, claimed[a2].token, meta, now=T0 + 2)
    assert _tokens_of(db, f"tokens:alice:{day}") == 200
    [again] = add(db, configured, user="alice", now=T0 + 86400)
    [j] = jobs.claim(db, "w", lease_s=30, now=T0 + 86400)
    jobs.complete(db, again, j.token, meta, now=T0 + 86400)
    assert _tokens_of(db, f"tokens:alice:{db.days.key(T0 + 86400)}") == 100


def test_finished_per_minute_counts_each_minute_by_final_status(db, configured):
    ids = add(db, configured, n=6, max_attempts=1)
    claimed = {j.id: j for j in jobs.claim(db, "w", k=6, lease_s=600, now=T0)}
    for jid, minute, outcome in ((ids[0], 0, "done"), (ids[1], 0, "done"), (ids[2], 2, "done"), (ids[3], 2, "dead"),
                                 (ids[4], 5, "done")):  # minute 5: past the range asked for
        now = T0 + minute * 60 + 59.5
        if outcome == "done":
            jobs.complete(db, jid, claimed[jid].token, None, now=now)
        else:
            jobs.fail(db, jid, claimed[jid].token, "boom", backoff=BACKOFF, now=now)
    admin.cancel(db, ids[5], now=T0 + 60)
    got = queries.finished_per_minute(db, int(T0), int(T0) + 3 * 60)
    assert got == {"done": [2, 0, 1], "dead": [0, 0, 1], "cancelled": [0, 1, 0]}
    assert queries.finished_per_minute(db, int(T0) - 120, int(T0)) == {"done": [0, 0], "dead": [0, 0],
                                                                        "cancelled": [0, 0]}
    with pytest.raises(InputError, match="whole minutes"):
        queries.finished_per_minute(db, int(T0) + 1, int(T0) + 61)


def test_finished_per_minute_reads_only_the_finished_index(db):
    """The status page asks every 2 s: the count must be a range of the jobs_finished index (covering), not a scan
    of the jobs table, whatever number of queued or old jobs it holds. The statement the store runs, traced."""
    ran: list[tuple[str, object]] = []
    db.conn.exec_trace = lambda cursor, sql, bindings: ran.append((sql, bindings)) or True
    try:
        queries.finished_per_minute(db, int(T0), int(T0) + 3600)
    finally:
        db.conn.exec_trace = None
    [(sql, bindings)] = [(s, b) for s, b in ran if "finished_at" in s]
    plan = db.conn.execute("EXPLAIN QUERY PLAN " + sql, bindings).fetchall()
    assert any("COVERING INDEX jobs_finished" in str(step) for step in plan), plan
