"""Limits (the old limits_config): per batch, per user queued, per plan per day; overrides live in the database
and apply to the very next submit; checks and insert are one transaction, so concurrent submits never overshoot."""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing as mp
import zoneinfo

import orjson
import pytest

from cardq.cli import exit_code
from cardq.errors import InputError
from cardq.store import Database, LimitExceeded, jobs, queries
from cardq.store import limits as store_limits
from cardq.store.submit import NewJob, submit
from cardq.store.usage import day_key, next_day_start

T0 = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC).timestamp()


def items(n):
    return [NewJob(orjson.dumps({"i": i})) for i in range(n)]


def count(db, user=None):
    sql = "SELECT count(*) FROM jobs" + (" WHERE user_id = ?" if user else "")
    return db.conn.execute(sql, (user,) if user else ()).fetchall()[0][0]


def finish_all(db, now):
    for job in jobs.claim(db, "w", k=10_000, lease_s=60, now=now):
        jobs.complete(db, job.id, job.token, None, now=now)


def test_batch_larger_than_max_items_is_rejected_whole(db, configured):
    with pytest.raises(LimitExceeded, match="201 items, batch_max_items_per_request is 200") as e:
        submit(db, items(201), user_id="u", plan="enterprise", configured=configured, now=T0)
    assert e.value.limit == "batch_max_items_per_request" and exit_code(e.value) == 3
    assert count(db) == 0
    assert len(submit(db, items(200), user_id="u", plan="enterprise", configured=configured, now=T0).ids) == 200


def test_per_user_queue_limit_counts_queued_and_processing_and_spares_others(db, configured):
    submit(db, items(200), user_id="a", plan="enterprise", configured=configured, now=T0)
    jobs.claim(db, "w", k=50, lease_s=60, now=T0)  # 150 queued + 50 processing
    submit(db, items(100), user_id="a", plan="enterprise", configured=configured, now=T0)
    with pytest.raises(LimitExceeded, match="too many requests: user a has 300 jobs queued or processing"):
        submit(db, items(1), user_id="a", plan="enterprise", configured=configured, now=T0)
    assert count(db, "a") == 300
    submit(db, items(5), user_id="b", plan="enterprise", configured=configured, now=T0)  # others unaffected
    finish_all(db, T0)  # done jobs no longer count against the queue limit
    submit(db, items(1), user_id="a", plan="enterprise", configured=configured, now=T0)


def test_daily_plan_limit_counts_done_today_and_resets_at_midnight(db, configured):
    submit(db, items(3), user_id="u", plan="free", configured=configured, now=T0)
    finish_all(db, T0)
    submit(db, items(2), user_id="u", plan="free", configured=configured, now=T0)  # 3 done + 2 queued = 5
    with pytest.raises(LimitExceeded, match="has 3 jobs done today and 2 queued or processing, this batch adds 1, "
                                            "plan free allows 5 a day") as e:
        submit(db, items(1), user_id="u", plan="free", configured=configured, now=T0)
    assert e.value.limit == "daily.free"
    finish_all(db, T0 + 60)
    with pytest.raises(LimitExceeded):
        submit(db, items(1), user_id="u", plan="free", configured=configured, now=T0 + 3600)
    tomorrow = next_day_start(T0, db.tz)
    submit(db, items(5), user_id="u", plan="free", configured=configured, now=tomorrow)
    with pytest.raises(LimitExceeded):
        submit(db, items(1), user_id="u", plan="free", configured=configured, now=tomorrow + 1)
    assert queries.stats(db, configured, now=tomorrow)["today"]["done"] == 0


def test_day_boundary_follows_the_configured_time_zone(open_db, configured):
    db = open_db(timezone="Europe/Moscow")  # UTC+3: local midnight is 21:00 UTC
    before = dt.datetime(2026, 11, 22, 20, 59, tzinfo=dt.UTC).timestamp()
    after = dt.datetime(2026, 11, 22, 21, 1, tzinfo=dt.UTC).timestamp()
    assert (day_key(before, db.tz), day_key(after, db.tz)) == ("2026-11-22", "2026-11-23")
    submit(db, items(5), user_id="u", plan="free", configured=configured, now=before)
    finish_all(db, before)
    with pytest.raises(LimitExceeded, match="resets at midnight Europe/Moscow"):
        submit(db, items(1), user_id="u", plan="free", configured=configured, now=before + 30)
    submit(db, items(5), user_id="u", plan="free", configured=configured, now=after)
    assert next_day_start(before, zoneinfo.ZoneInfo("Europe/Moscow")) == after - 60


def test_dead_and_cancelled_jobs_free_their_slot(db, configured):
    ids = submit(db, items(5), user_id="u", plan="free", configured=configured, now=T0).ids
    [job] = jobs.claim(db, "w", lease_s=60, now=T0)
    jobs.fail(db, job.id, job.token, "bad item", permanent=True, backoff=jobs.Backoff(), now=T0)
    from cardq.store import admin

    admin.cancel(db, ids[1], now=T0)
    submit(db, items(2), user_id="u", plan="free", configured=configured, now=T0)


def test_unknown_plan_and_bad_priority_are_input_errors(db, configured):
    with pytest.raises(InputError, match="unknown plan 'gold'; expected one of: free, basic, professional"):
        submit(db, items(1), user_id="u", plan="gold", configured=configured, now=T0)
    with pytest.raises(InputError, match="priority -1"):
        submit(db, items(1), user_id="u", plan="free", priority=-1, configured=configured, now=T0)
    assert count(db) == 0


def test_payload_over_max_bytes_names_the_item(db, configured):
    big = [NewJob(b'{"a":1}', where="x.jsonl line 1"), NewJob(b'{"a":"' + b"x" * 70_000 + b'"}',
                                                              where="x.jsonl line 2")]
    with pytest.raises(InputError, match="x.jsonl line 2: payload is 70008 bytes, max_payload_bytes is 65536"):
        submit(db, big, user_id="u", plan="free", configured=configured, now=T0)
    assert count(db) == 0


def test_override_applies_to_the_next_submit_and_unset_restores(db, configured):
    def effective(key):
        return db.read(lambda c: store_limits.effective(c, configured))[key]

    assert (effective("daily.free").value, effective("daily.free").source) == (5, "default")
    db.write(lambda c: store_limits.set_override(c, "daily.free", 1, T0))
    assert (effective("daily.free").value, effective("daily.free").source) == (1, "override")
    with pytest.raises(LimitExceeded, match="plan free allows 1 a day"):
        submit(db, items(2), user_id="u", plan="free", configured=configured, now=T0)
    assert db.write(lambda c: store_limits.unset_override(c, "daily.free"))
    assert not db.write(lambda c: store_limits.unset_override(c, "daily.free"))
    submit(db, items(2), user_id="u", plan="free", configured=configured, now=T0)


def test_validate_limit_values(configured):
    assert store_limits.validate(configured, "daily.free", "10") == 10
    assert store_limits.validate(configured, "daily.free", "0") == 0
    for key, value, msg in (("nope", "1", "unknown limit 'nope'; expected one of"),
                            ("daily.gold", "1", "plans come from config.toml"),
                            ("batch_max_queued_per_user", "0", "expected a whole number from 1 to"),
                            ("daily.free", "-1", "expected a whole number from 0 to"),
                            ("daily.free", "lots", "expected a whole number")):
        with pytest.raises(InputError, match=msg):
            store_limits.validate(configured, key, value)


def _submit_loop(path: str, configured: dict, user: str, rounds: int, out: mp.Queue) -> None:
    db = Database.open(path, busy_timeout_ms=10_000)
    accepted = 0
    for _ in range(rounds):
        with contextlib.suppress(LimitExceeded):
            accepted += submit(db, items(3), user_id=user, plan="enterprise", configured=configured).created
    db.close()
    out.put(accepted)


@pytest.mark.slow
def test_concurrent_submits_never_overshoot_the_user_limit(db, configured):
    """Four processes race to fill one user's queue (limit 100, batches of 3): never more than 100 accepted."""
    configured = {**configured, "batch_max_queued_per_user": (100, "config")}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_submit_loop, args=(str(db.path), configured, "u", 40, out)) for _ in range(4)]
    for p in procs:
        p.start()
    accepted = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert accepted == count(db, "u") == 99  # 33 batches of 3; the 34th would make 102


@pytest.mark.parametrize("zone", ["UTC", "Europe/Moscow", "America/New_York", "Australia/Lord_Howe"])
def test_cached_day_clock_agrees_with_day_key_across_dst(zone):
    """The cached day bounds give the same day as a fresh conversion, in any order, across DST changes."""
    import random

    from cardq.store.usage import DayClock

    tz = zoneinfo.ZoneInfo(zone)
    clock = DayClock(tz)
    rng = random.Random(zone)
    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()
    times = sorted(start + rng.uniform(0, 300 * 86400) for _ in range(3000))
    for t in times + rng.sample(times, 500):  # forwards, then jumping around
        assert clock.key(t) == day_key(t, tz)
