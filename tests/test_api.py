"""The public Python API (`import cardq`), as an app uses it: typed errors with their data, paging, waiting,
limits that follow config.toml, actor calls with and without a supervisor, one Queue shared by many threads."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import zoneinfo
from pathlib import Path

import orjson
import pytest

import cardq
from cardq.actors.gateslots import GateSlots
from cardq.actors.protocol import socket_path
from cardq.store import usage

from conftest import wait_for
from supervision import Deployment


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A deployment folder as `cardq init` makes it (default config, database, key file)."""
    cardq.init(tmp_path / "config.toml")
    return tmp_path / "config.toml"


@pytest.fixture
def q(site: Path):
    with cardq.connect(site, name="test") as queue:
        yield queue


def items(n: int, **extra) -> list[dict]:
    return [{"title": f"Item {i}", "category": "home", **extra} for i in range(n)]


def test_submit_job_and_pages_of_jobs(q):
    batch = q.submit(items(3), user="u1", plan="basic", priority=2)
    assert isinstance(batch, cardq.Batch) and batch.created == 3 and batch.existing == 0
    job = q.job(batch.ids[0])
    assert (job.status, job.user_id, job.plan, job.kind, job.priority) == ("queued", "u1", "basic", "card", 2)
    assert job.payload == {"title": "Item 0", "category": "home"} and job.result is None and job.errors == []
    assert not job.finished and job.to_dict()["id"] == job.id
    more = q.submit(items(4), user="u2", plan="basic", kind="thumb")
    seen, cursor = [], None
    while True:
        page = q.jobs(limit=3, cursor=cursor)
        seen += [j.id for j in page.jobs]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert seen == sorted(batch.ids + more.ids, reverse=True)  # newest first, each exactly once
    assert [j.id for j in q.jobs(kind="thumb", user="u2").jobs] == sorted(more.ids, reverse=True)
    assert q.jobs(status="done").jobs == []


def test_idempotency_key_field_maps_a_resubmit_to_the_same_job(q):
    first = q.submit([{"title": "A", "sku": "A1"}, {"title": "B", "sku": "B1"}], user="u1", plan="basic",
                     idempotency_key_field="sku")
    again = q.submit([{"title": "B again", "sku": "B1"}, {"title": "C", "sku": "C1"}], user="u1", plan="basic",
                     idempotency_key_field="sku")
    assert again.ids[0] == first.ids[1] and (again.created, again.existing) == (1, 1)


def test_errors_are_typed_and_carry_their_data(q):
    with pytest.raises(cardq.InputError) as e:
        q.submit([{"title": "ok"}, {"title": "ok"}, ["not", "an", "object"]], user="u1", plan="basic")
    assert e.value.index == 2 and e.value.where == "item 2" and "expected a JSON object" in str(e.value)
    with pytest.raises(cardq.InputError) as e:
        q.submit([{"title": "ok"}, {"title": object()}], user="u1", plan="basic")
    assert e.value.index == 1 and "not JSON" in e.value.reason
    with pytest.raises(cardq.InputError) as e:
        q.submit([{"title": "no key"}], user="u1", plan="basic", idempotency_key_field="sku")
    assert e.value.index == 0 and "'sku'" in str(e.value)

    q.submit(items(3), user="carol", plan="free")
    before = time.time()
    with pytest.raises(cardq.LimitExceeded) as e:
        q.submit(items(3), user="carol", plan="free")
    err = e.value
    assert (err.limit, err.allowed, err.current, err.requested) == ("daily.free", 5, 3, 3)
    assert err.resets_at == usage.next_day_start(before, zoneinfo.ZoneInfo(q.config.config.limits.timezone))
    assert isinstance(err, cardq.Error) and "nothing was submitted" in str(err)
    with pytest.raises(cardq.LimitExceeded) as e:
        q.submit(items(201), user="big", plan="enterprise")
    assert (e.value.limit, e.value.allowed, e.value.requested, e.value.resets_at) == (
        "batch_max_items_per_request", 200, 201, None)

    with pytest.raises(cardq.JobNotFound) as e:
        q.job(999_999)
    assert e.value.job_id == 999_999
    with pytest.raises(cardq.InvalidTransition):
        q.retry(q.submit(items(1), user="u9", plan="basic").ids[0])  # queued: nothing to retry
    assert q.cancel(q.jobs(user="u9").jobs[0].id) == "queued"


def test_limits_follow_config_toml_without_restarting_the_app(q, site):
    assert q.limits()["daily.free"].value == 5
    q.submit(items(2), user="a", plan="free")
    site.write_text(site.read_text().replace("free = 5", "free = 2"))
    # The next submit applies what the file says now, like `cardq limits` does.
    with pytest.raises(cardq.LimitExceeded) as e:
        q.submit(items(1), user="a", plan="free")
    assert e.value.allowed == 2
    assert q.limits()["daily.free"].value == 2
    # An override beats the file; unset goes back to it.
    assert q.set_limit("daily.free", 10) == 10 and q.limits()["daily.free"].source == "override"
    q.submit(items(1), user="a", plan="free")
    assert q.unset_limit("daily.free") and q.limits()["daily.free"].value == 2
    # A file that became invalid is not applied: the last valid config stays in effect, and it says why.
    site.write_text(site.read_text().replace("free = 2", "free = -1"))
    q.submit(items(2), user="b", plan="free")
    with pytest.raises(cardq.LimitExceeded) as e:
        q.submit(items(1), user="b", plan="free")
    assert e.value.allowed == 2 and "limits.daily.free = -1" in q.config_error
    site.write_text(site.read_text().replace("free = -1", "free = 3"))  # fixed: applies, and the error is gone
    q.submit(items(1), user="b", plan="free")
    assert q.config_error is None and q.limits()["daily.free"].value == 3


def test_threads_that_end_take_their_connections_with_them(q):
    # A thread-per-request server: every request on a new thread. Descriptors stay bounded.
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    q.submit(items(1), user="u", plan="enterprise")
    before = fds()
    for _ in range(50):
        t = threading.Thread(target=lambda: q.submit(items(1), user="u", plan="enterprise"))
        t.start()
        t.join()
    assert fds() <= before + 3  # not 2 more per thread (the database and its WAL)
    assert q.jobs(user="u", limit=100).jobs[50].status == "queued"  # 51 jobs: every thread's submit counted


def test_wait_answers_for_every_id_given_even_repeated(q):
    batch = q.submit([{"title": "A", "sku": "1"}, {"title": "B", "sku": "2"}, {"title": "A again", "sku": "1"}],
                     user="u1", plan="basic", idempotency_key_field="sku")
    assert batch.ids[0] == batch.ids[2]
    assert [j.id for j in q.wait(batch.ids, timeout=0)] == batch.ids  # nothing runs: the states now, one per id


def test_a_store_change_in_config_toml_waits_for_a_restart(q, site):
    q.submit(items(1), user="u1", plan="basic")
    site.write_text(site.read_text().replace('path = "./cardq.db"', 'path = "./other.db"').replace(
        "free = 5", "free = 7"))
    assert q.limits()["daily.free"].value == 7  # the rest applies now
    assert q.config.db_path.name == "cardq.db" and "[store] changed" in q.config_error
    seen = []
    t = threading.Thread(target=lambda: seen.append(q.pending()))  # a new thread: the same database
    t.start()
    t.join()
    assert seen == [1] and q.pending() == 1


def test_misuse_gets_a_cardq_error_not_a_traceback(q, site):
    with pytest.raises(cardq.NotRunning):
        q.reload()
    with pytest.raises(cardq.NotRunning):
        q.stop()
    errors = []

    def run_in_thread():
        try:
            cardq.supervise(site, burst=True)
        except cardq.Error as e:
            errors.append(e)

    t = threading.Thread(target=run_in_thread)
    t.start()
    t.join(60)
    assert errors and "main thread" in str(errors[0])
    with pytest.raises(cardq.NotRunning):  # and it left no lock behind
        q.stop()
    with pytest.raises(cardq.InputError, match="format 'xml'"):
        q.submit_file(site, user="u", plan="basic", fmt="xml")
    (q.config.run_dir / "cardq.key").unlink()  # no key yet: nothing can be reached, and "allow" still allows
    assert q.ratelimit.check("k", on_unavailable="allow").unavailable
    q.close()
    with pytest.raises(cardq.Error, match="closed"):
        q.job(1)


def test_purge_dry_run_counts_and_deletes_nothing(q):
    ids = q.submit(items(2), user="u1", plan="basic").ids
    for job_id in ids:
        q.cancel(job_id)
    assert q.purge(0, statuses=["cancelled"], dry_run=True) == 2
    assert len(q.jobs().jobs) == 2
    assert q.purge("0s", statuses=["cancelled"]) == 2 and q.jobs().jobs == []


def test_throughput_counts_a_minute_once_it_is_over(q):
    from cardq.store import Database, admin

    ids = q.submit(items(3), user="u1", plan="basic").ids
    now = time.time()
    db = Database.open(q.config.db_path)
    try:
        admin.cancel(db, ids[0], now=now - 600)  # a minute long over
        admin.cancel(db, ids[1], now=now)  # this minute, still counting
    finally:
        db.close()
    t = q.throughput(minutes=60)
    assert len(t["done"]) == len(t["dead"]) == len(t["cancelled"]) == 60 and t["minute_s"] == 60
    assert t["cancelled"][(int(now - 600) - t["since"]) // 60] == 1
    assert t["cancelled"][(int(now) - t["since"]) // 60] == 1 and sum(t["cancelled"]) == 2
    assert sum(t["done"]) == sum(t["dead"]) == 0
    assert q.purge(0, statuses=["cancelled"]) == 2
    # The minute that is over was counted once and kept; the current one is counted again (now without its job).
    assert sum(q.throughput(minutes=60)["cancelled"]) == 1
    with pytest.raises(cardq.InputError, match="minutes 0"):
        q.throughput(minutes=0)


def test_actor_calls_fail_at_once_when_no_supervisor_runs(site, tmp_path):
    # An ask timeout of 10 minutes: were the client to wait for it, this test would time out instead.
    site.write_text(site.read_text().replace("ask_timeout_ms = 2000", "ask_timeout_ms = 600000"))
    with cardq.connect(site) as q:
        with pytest.raises(cardq.ActorUnavailable, match="no supervisor runs"):
            q.ratelimit.check("ip:1.2.3.4")
        decision = q.ratelimit.check("ip:1.2.3.4", on_unavailable="allow")
        assert decision.allowed and decision.unavailable and q.ratelimit.allowed_unavailable == 1
        with q.gate("generation"):  # a free slot is a lock in this process: no actor needed
            pass
        occupier = GateSlots(q.config.run_dir, "generation")
        while occupier.try_take(4) is not None:
            pass
        with pytest.raises(cardq.ActorUnavailable), q.gate("generation"):  # none free: the queue is the actor's
            pass
        occupier.close()
        with pytest.raises(cardq.ActorUnavailable):
            q.counter.incr("k")
        with pytest.raises(cardq.InputError, match="on_unavailable"):
            q.ratelimit.check("k", on_unavailable="maybe")
        # A socket file left behind by a killed supervisor (nothing listens on it): at once too.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(socket_path(q.config.run_dir, "ratelimit", 0)))
        stale.close()
        with pytest.raises(cardq.ActorUnavailable, match="no supervisor runs"):
            q.ratelimit.check("ip:1.2.3.4")
        # Events are never lost: with no collector they go to the durable inbox.
        q.events.record(path="/cards/1", status=200, response_ms=1.0, client_ip="10.0.0.1", request_id="r1")
        assert q.events.flush(60) and q.events.to_inbox == 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wait_returns_when_jobs_finish_and_sleeps_while_nothing_changes(tmp_path):
    d = Deployment(tmp_path)
    try:
        with cardq.connect(d.config_path) as q:
            quick = q.submit([{"sleep": 0.01}] * 10, user="u1", plan="enterprise").ids
            slow = q.submit([{"sleep": 600}], user="u2", plan="enterprise").ids
            d.start()
            jobs = q.wait(quick, timeout=120)
            assert [j.status for j in jobs] == ["done"] * 10 and all(j.result["job"] == j.id for j in jobs)
            wait_for(lambda: q.job(slow[0]).status == "processing", 60, what="the slow job running")
            # Nothing changes for a second: wait() sleeps (backing off) instead of spinning on the database.
            cpu = time.process_time()
            [job] = q.wait(slow, timeout=1.0)
            assert job.status == "processing" and not job.finished
            assert time.process_time() - cpu < 0.3
    finally:
        d.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_permit_whose_release_failed_is_given_back_by_any_thread(tmp_path):
    # A request holds a permit that the actor holds for it (it queued: no slot was free) while the supervisor is
    # stopped (a deploy): its release cannot reach the actor. The thread ends; the next call of any thread, once
    # actors are back, gives the permit back.
    d = Deployment(tmp_path, workers={"count": 0}, gates={"one": {"max_concurrency": 1}})
    try:
        first = d.start()
        run_dir = d.loaded.run_dir
        wait_for(lambda: socket_path(run_dir, "ratelimit", 0).exists(), 60, what="the rate limiter")
        q = cardq.connect(d.config_path)
        occupier = GateSlots(run_dir, "one")  # another holder has the only slot: the request must queue
        assert occupier.try_take(1) == 0

        def request() -> None:
            with q.gate("one"):
                first.send_signal(signal.SIGTERM)
                first.wait(60)

        t = threading.Thread(target=request)
        t.start()
        wait_for(lambda: q.gate_stats()["one"]["queued"] == 1, 30, what="the request queued at the actor")
        occupier.give(0)  # the actor takes the slot for the request
        t.join(120)
        occupier.close()
        assert q._unreleased  # kept by the Queue, not by the thread's client that is gone
        d.start()
        wait_for(lambda: socket_path(run_dir, "ratelimit", 0).exists(), 60, what="the rate limiter again")
        # The restarted actor holds the slot again for that permit; the Queue's next call gives it back.
        wait_for(lambda: q.gate_stats()["one"]["active"] == 0, 30, what="the permit given back")
        assert not q._unreleased
        with q.gate("one"):  # and the gate's only slot is free again
            pass
        q.close()
    finally:
        d.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_queue_shared_by_eight_threads(tmp_path):
    d = Deployment(tmp_path, workers={"count": 2})
    try:
        d.start()
        loaded = d.loaded
        wait_for(lambda: all(socket_path(loaded.run_dir, a, 0).exists() for a in ("counter", "ratelimit", "paths")),
                 60, what="actors listening")
        q = cardq.connect(d.config_path, name="web")
        results: dict[int, dict] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def request_loop(n: int) -> None:
            try:
                start.wait(30)
                out = {"ids": [], "allowed": 0, "events": 0}
                for i in range(20):
                    out["ids"] += q.submit([{"sleep": 0}], user=f"user{n}", plan="enterprise").ids
                    out["allowed"] += q.ratelimit.check(f"ip:{n}").allowed
                    with q.gate("generation"):
                        q.counter.incr("requests", op_id=f"{n}-{i}")
                    for k in range(5):
                        q.events.record(path=f"/t/{n}", status=200, response_ms=1.0, client_ip=f"10.0.0.{n}",
                                        request_id=f"{i}-{k}")
                        out["events"] += 1
                results[n] = out
            except BaseException as e:  # noqa: BLE001 - reported below, with the thread that raised it
                errors.append(e)

        threads = [threading.Thread(target=request_loop, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        ids = [i for r in results.values() for i in r["ids"]]
        assert len(ids) == len(set(ids)) == 160
        assert all(r["allowed"] == 20 for r in results.values())  # 20 of each key's 60 per minute
        assert q.counter.get("requests") == 160
        assert q.events.flush(60)
        jobs = q.wait(ids, timeout=120)
        assert {j.status for j in jobs} == {"done"}
        assert wait_for(lambda: d.db.conn.execute("SELECT count(*) FROM traffic_events").fetchall()[0][0] == 800,
                        60, what="800 events stored")
        requests = d.db.conn.execute("SELECT sum(requests) FROM path_stats_hourly").fetchall()[0][0]
        assert requests == 800
        q.close()
    finally:
        d.close()


def test_status_matches_what_the_cli_prints(q, site):
    from click.testing import CliRunner

    from cardq.cli import cli

    q.submit(items(2), user="u1", plan="basic")
    out = CliRunner().invoke(cli, ["status", "--json", "--config", str(site)], catch_exceptions=False)
    cli_data = orjson.loads(out.stdout)
    api_data = q.status()
    assert cli_data["jobs"] == api_data["jobs"] == {**dict.fromkeys(cardq.STATUSES, 0), "queued": 2}
    assert cli_data["limits"] == api_data["limits"] and api_data["supervisor"]["running"] is False


def test_cardq_files_are_the_owners_only_and_looser_ones_are_reported(tmp_path):
    old = os.umask(0o022)  # the usual umask, under which plain files come out 0644
    try:
        config = tmp_path / "site" / "config.toml"
        cardq.init(config)
        with cardq.connect(config) as q:
            q.submit(items(1), user="u", plan="basic")
            db = q.config.db_path
            for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                         q.config.run_dir / "cardq.key"):
                assert path.stat().st_mode & 0o777 == 0o600, path
            assert q.status()["warnings"] == []
            assert all(c.ok for c in cardq.selftest(config) if c.name == "permissions")
            db.chmod(0o644)
            [warning] = q.status()["warnings"]
            assert str(db) in warning and "mode 644" in warning and "expected 600" in warning
            [check] = [c for c in cardq.selftest(config) if c.name == "permissions"]
            assert not check.ok and "mode 644" in check.detail
    finally:
        os.umask(old)
