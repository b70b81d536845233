"""`cardq supervise` with real processes and real signals. Every wait is a condition with a deadline.

Leases are long (60 s) and periodic recovery is off (120 s) in these deployments, so whenever a job comes back
quickly it was the supervisor's death handling that brought it back, not lease expiry.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import time

import apsw
import orjson
import pytest

import cardq
from cardq.actors.gateslots import GateSlots
from cardq.store import processes as store_processes

from conftest import wait_for
from supervision import Deployment, pid_gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def deploy(tmp_path):
    made: list[Deployment] = []

    def factory(**overrides) -> Deployment:
        d = Deployment(tmp_path / f"d{len(made)}", **overrides) if made else Deployment(tmp_path, **overrides)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.close()


@pytest.mark.parametrize("prefetch", [1, 16])
def test_burst_runs_every_job_and_exits_zero(deploy, prefetch):
    d = deploy(workers={"prefetch": prefetch})
    ids = d.submit([{"n": i} for i in range(50)])
    proc = d.start("--burst")
    assert proc.wait(60) == 0, d.output()
    assert d.statuses() == {"done": 50}
    results = [d.job(i)["result"] for i in ids]
    assert sorted(r["job"] for r in results) == ids and all(r["attempt"] == 1 for r in results)


def test_second_supervisor_is_refused_naming_the_first(deploy):
    d = deploy()
    first = d.start()
    wait_for(lambda: d.supervisor_row(), 30, what="first supervisor up")
    second = d.cardq("supervise")
    assert second.returncode == 1
    assert f"another supervisor (pid {first.pid}) is running" in second.stderr
    assert first.poll() is None
    for path in (d.root / "cardq.log", d.loaded.db_path.with_name("cardq.db.supervisor")):
        assert path.stat().st_mode & 0o777 == 0o600, path  # not every local user's to read


def test_a_second_name_for_the_database_does_not_get_a_second_supervisor(deploy, tmp_path):
    # A symlink to the database (and one to its folder) finds the running supervisor's lock; a hard link is
    # refused outright. Before, the lock was keyed on the path's text and a second supervisor "recovered" live jobs.
    d = deploy()
    first = d.start()
    wait_for(lambda: d.supervisor_row(), 30, what="first supervisor up")
    (tmp_path / "alias.db").symlink_to(d.loaded.db_path)
    (tmp_path / "folder-alias").symlink_to(d.loaded.db_path.parent)
    for path in (tmp_path / "alias.db", tmp_path / "folder-alias" / d.loaded.db_path.name):
        other = tmp_path / f"other-{path.name}.toml"
        other.write_text(d.config_path.read_text().replace('"path" = "cardq.db"', f'"path" = "{path}"'))
        second = d.cardq("supervise", "--config", str(other))
        assert second.returncode == 1 and f"another supervisor (pid {first.pid}) is running" in second.stderr
        status = d.cardq("status", "--json", "--config", str(other))
        assert orjson.loads(status.stdout)["supervisor"]["pid"] == first.pid
    os.link(d.loaded.db_path, tmp_path / "hard.db")
    other = tmp_path / "other-hard.toml"
    other.write_text(d.config_path.read_text().replace('"path" = "cardq.db"', f'"path" = "{tmp_path / "hard.db"}"'))
    second = d.cardq("supervise", "--config", str(other))
    assert second.returncode == 1 and "has 2 names (hard links)" in second.stderr
    assert first.poll() is None


def side_effect_runs(path: str, job_id: int) -> int:
    if not os.path.exists(path):
        return 0
    conn = apsw.Connection(path)
    try:
        conn.setbusytimeout(10_000)
        rows = conn.execute("SELECT runs FROM effects WHERE job_id = ?", (job_id,)).fetchall()
    except apsw.SQLError:  # the table is not there yet
        rows = []
    finally:
        conn.close()
    return rows[0][0] if rows else 0


def test_kill_9_worker_mid_job_requeues_at_once_and_runs_once_more(deploy, tmp_path):
    d = deploy(workers={"count": 1})
    side = str(tmp_path / "side.db")
    [jid] = d.submit([{"sleep": 4.0, "side_db": side}])
    proc = d.start()
    # The handler has started once its side effect is written (its first step); then kill its worker.
    wait_for(lambda: side_effect_runs(side, jid) == 1, 30, what="the handler running")
    worker = wait_for(lambda: d.worker_holding(jid), 30, what="the worker holding the job")
    os.kill(worker["pid"], signal.SIGKILL)
    # Back in the queue long before its 60 s lease could expire: released by owner on the worker's death.
    wait_for(lambda: "killed by SIGKILL" in (d.job(jid)["last_error"] or ""), 5, what="job released")
    wait_for(lambda: d.job(jid)["status"] == "done", 30, what="job done on the restarted worker")
    job = d.job(jid)
    assert job["attempts"] == 2 and job["result"]["attempt"] == 2
    assert [e["error"] for e in job["errors"]] == ["killed by SIGKILL"]
    restarted = wait_for(lambda: [w for w in d.workers() if w["restarts"] == 1], 10)
    assert restarted[0]["last_exit"] == "killed by SIGKILL" and restarted[0]["pid"] != worker["pid"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_kill_9_supervisor_takes_its_children_and_a_new_one_recovers_every_job(deploy):
    d = deploy(workers={"count": 2})
    ids = d.submit([{"sleep": 0.5} for _ in range(8)])
    proc = d.start()
    busy = wait_for(lambda: [w["pid"] for w in d.workers() if w["state"] == "busy" and w["pid"]], 30)
    children = [w["pid"] for w in d.workers() if w["pid"]]
    assert set(busy) <= set(children)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: all(pid_gone(pid) for pid in children), 5, what="children exit with their supervisor")
    assert d.statuses(ids).get("processing", 0) >= 1  # jobs left held by the dead workers
    again = d.start("--burst")
    assert again.wait(60) == 0, d.output(1)
    assert d.statuses(ids) == {"done": 8}
    recovered = [i for i in ids if d.job(i)["attempts"] == 2]
    assert recovered and all("supervisor stopped" in d.job(i)["errors"][0]["error"] for i in recovered)


def test_sigterm_lets_in_flight_jobs_finish_and_claims_nothing_new(deploy):
    d = deploy(workers={"count": 2})
    ids = d.submit([{"sleep": 1.0} for _ in range(6)])
    proc = d.start()
    # In flight = claimed, read from the jobs table in one query. (The processes table is a 1 Hz snapshot whose
    # "busy" also covers a worker between two jobs, with current_job None.)
    def two_in_flight():
        held = [r[0] for r in d.db.conn.execute("SELECT id FROM jobs WHERE status = 'processing'").fetchall()]
        return held if len(held) == 2 else None

    in_flight = wait_for(two_in_flight, 30, what="two jobs in flight")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, d.output()
    for jid in in_flight:
        assert d.job(jid)["status"] == "done"
    counts = d.statuses(ids)
    assert counts.get("processing", 0) == 0 and counts["done"] + counts.get("queued", 0) == 6
    assert all(d.job(i)["attempts"] == 0 for i in ids if d.job(i)["status"] == "queued")


def test_a_result_too_deep_to_store_fails_its_job_and_never_the_worker(deploy, tmp_path):
    # 253 levels passed the old check and broke the batch encoding: the worker died, the job came back without
    # an attempt counted, its side effect repeated, and the supervisor exited on restart intensity.
    d = deploy(workers={"count": 1, "prefetch": 4})
    side = str(tmp_path / "side.db")
    bad, *good = d.submit([{"deep": 253, "side_db": side}, {"sleep": 0}, {"sleep": 0}])
    proc = d.start("--burst")
    assert proc.wait(120) == 0, d.output()
    job = d.job(bad)
    assert job["status"] == "dead" and job["attempts"] == 1 and side_effect_runs(side, bad) == 1
    assert "cannot be stored: nested deeper than 64 levels" in job["last_error"]
    assert all(d.job(i)["status"] == "done" for i in good)
    assert [w["restarts"] for w in d.workers()] in ([], [0])


def test_a_worker_killed_after_its_handler_returned_does_not_charge_the_job(deploy, tmp_path):
    # The database stays locked (another process holds its write lock) while the worker would store the result of
    # a successful handler; the worker is killed there. That death is not the job's: with poison_kills = 1 the
    # old code made the job dead "killed its worker 1 times"; it is given back untouched and done on the next try.
    # (It used to stall in the gate's release to a stopped rate limiter; a gate is now a lock in the worker.)
    # A short busy timeout: the worker says it is blocked (storing the result) within a moment.
    d = deploy(workers={"count": 1}, supervisor={"poison_kills": 1},
               store={"busy_timeout_ms": 200, "busy_retries": 1})
    marker, go, side = tmp_path / "returned", tmp_path / "go", str(tmp_path / "side.db")
    [jid] = d.submit([{"side_db": side, "wait_file": str(go), "touch_after": str(marker)}])
    proc = d.start()
    wait_for(lambda: side_effect_runs(side, jid) == 1, 30, what="the handler running")
    worker = wait_for(lambda: (d.worker_holding(jid) or {}).get("pid"), 30, what="the worker holding the job")
    blocker = apsw.Connection(str(d.loaded.db_path))
    blocker.setbusytimeout(30_000)
    blocker.execute("BEGIN IMMEDIATE")  # before the handler returns: its result cannot be stored
    try:
        go.touch()
        wait_for(marker.exists, 30, what="the handler about to return")
        # The marker is touched inside the handler: the kill must wait until the worker is past it, storing the
        # result (it says so once its write has waited out the busy timeout).
        wait_for(lambda: any(line.get("event") == "worker.blocked" for line in d.log_lines()), 60,
                 what="the worker blocked storing the result")
        assert d.job(jid)["status"] == "processing"
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: pid_gone(worker), 10, what="the worker gone")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: d.job(jid)["status"] != "processing" or d.job(jid)["attempts"] > 1, 30, what="job released")
    wait_for(lambda: d.job(jid)["status"] == "done", 60, what="the job done on the next try")
    job = d.job(jid)
    assert job["attempts"] == 1 and job["errors"] == []  # the killed try was given back, not counted
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_stop_gives_back_the_rest_of_a_prefetched_batch(deploy, tmp_path):
    # One worker claims all four jobs at once; a stop during the first lets it finish that one and gives the
    # other three back untouched (not run, no attempt counted), rather than running the whole batch.
    d = deploy(workers={"count": 1, "prefetch": 4})
    side = str(tmp_path / "side.db")
    ids = d.submit([{"sleep": 2.0, "side_db": side} for _ in range(4)])
    proc = d.start()
    wait_for(lambda: sum(side_effect_runs(side, i) for i in ids) == 1, 30, what="the first job running")
    assert d.statuses(ids) == {"processing": 4}  # all four are held by the worker
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert d.statuses(ids) == {"done": 1, "queued": 3}
    assert sum(side_effect_runs(side, i) for i in ids) == 1
    assert all(d.job(i)["attempts"] == 0 for i in ids if d.job(i)["status"] == "queued")


def test_second_sigint_stops_at_once_and_requeues_in_flight_jobs(deploy):
    d = deploy(workers={"count": 1})
    [jid] = d.submit([{"sleep": 30}])
    proc = d.start()
    wait_for(lambda: d.busy_worker_on(jid), 30)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: (d.supervisor_row() or {}).get("state") == "stopping", 10)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    job = d.job(jid)
    assert job["status"] == "queued" and job["attempts"] == 0  # given back untouched: not the job's fault


def test_sighup_with_broken_config_keeps_the_old_one_and_says_so(deploy):
    d = deploy()
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    before = d.supervisor_row()["info"]
    good = d.config_path.read_text()
    d.write_config(workers={"count": "many"})
    refused = d.cardq("reload")  # the CLI checks the file before signalling, and says what is wrong
    assert refused.returncode == 2 and 'workers.count = "many"' in refused.stderr
    os.kill(proc.pid, signal.SIGHUP)  # a raw SIGHUP (systemd's ExecReload) reaches the supervisor anyway
    info = wait_for(lambda: (d.supervisor_row()["info"] if d.supervisor_row()["info"]["last_reload_error"]
                             else None), 10, what="reload error published")
    assert 'workers.count = "many": expected an integer' in info["last_reload_error"]
    assert (info["config_digest"], info["config_version"]) == (before["config_digest"], 1)
    assert before["last_reload_at"] is None and info["last_reload_at"] >= before["config_loaded_at"]
    status = orjson.loads(d.cardq("status", "--json").stdout)
    assert status["supervisor"]["running"] and status["supervisor"]["last_reload_error"]
    assert "LAST RELOAD FAILED" in d.cardq("status").stdout
    assert proc.poll() is None
    wait_for(lambda: any(line["event"] == "config.reload_failed" for line in d.log_lines()), 30,
             what="the refusal logged")  # the log is written by a thread: asynchronously
    d.config_path.write_text(good)  # fixed: the next reload applies and clears the error
    assert d.cardq("reload").returncode == 0
    wait_for(lambda: d.supervisor_row()["info"]["config_version"] == 2, 10, what="good config applied")
    after = d.supervisor_row()["info"]
    assert after["last_reload_error"] is None and after["last_reload_at"] == after["config_loaded_at"] >= \
        info["last_reload_at"]


def test_a_reload_that_changes_a_restart_only_key_is_refused_whole(deploy, tmp_path):
    # Before: a new actors.run_dir (and a new worker count beside it) applied at once; workers looked for the
    # key file in the new folder and 348 of 400 jobs were dead within 15 s.
    d = deploy(workers={"count": 1})
    ids = d.submit([{"sleep": 0.05} for _ in range(100)])
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    d.write_config(actors={"run_dir": str(tmp_path / "elsewhere")}, workers={"count": 2})
    os.kill(proc.pid, signal.SIGHUP)
    info = wait_for(lambda: (d.supervisor_row()["info"] if d.supervisor_row()["info"]["last_reload_error"]
                             else None), 10, what="reload refused")
    assert "actors.run_dir changed, which needs a restart" in info["last_reload_error"]
    assert info["config_version"] == 1 and info["workers_desired"] == 1  # kept whole: not even the count
    wait_for(lambda: d.statuses(ids).get("done", 0) == 100, 120, what="every job done")
    assert proc.poll() is None


def test_log_settings_apply_on_reload_and_sighup_reopens_the_log_file(deploy, tmp_path):
    d = deploy(workers={"count": 1}, log={"level": "info"})
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    # logrotate: the file is moved away, then SIGHUP; new lines go to a new cardq.log, not the moved one.
    (d.root / "cardq.log").rename(d.root / "cardq.log.1")
    out = d.cardq("reload")
    assert out.returncode == 0 and "reloaded: supervisor pid" in out.stdout and "version 2" in out.stdout
    d.submit([{"sleep": 0}])
    wait_for(lambda: any(e.get("event") == "worker.started" or "job_id" in e for e in d.log_lines()), 30,
             what="lines in the new cardq.log")
    # log.level = warning on reload: info lines stop. Shown by a worker restart after it: the exit is a warning
    # (logged), the new worker's start an info line (not logged). (Lines logged before the reload may still be
    # on their way to the file: the test looks only at lines about things that happen after it.)
    d.write_config(log={"level": "warning"})
    out = d.cardq("reload")
    assert out.returncode == 0 and "version 3" in out.stdout
    old = wait_for(lambda: next((w["pid"] for w in d.workers() if w["pid"]), None), 30, what="the worker")
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: next((w["pid"] for w in d.workers() if w["pid"] and w["pid"] != old), None), 30,
                   what="the restarted worker")
    d.submit([{"fail": "boom"}])  # the new worker's failure: a warning, logged after its start would have been
    wait_for(lambda: any(e.get("event") == "job.failed" and e.get("pid") == new for e in d.log_lines()), 30,
             what="the new worker's warning")
    events = [(e.get("event"), e.get("child_pid")) for e in d.log_lines()]
    assert ("child.exited", old) in events and ("child.started", new) not in events
    # log.file changed on reload: lines go to the new file from then on.
    d.write_config(log={"file": "other.log", "level": "warning"})
    assert d.cardq("reload").returncode == 0
    d.submit([{"fail": "again"}])
    wait_for(lambda: (d.root / "other.log").exists() and b"job.failed" in (d.root / "other.log").read_bytes(), 30,
             what="the new log file")
    # A reload the supervisor refuses says so, with exit 2.
    d.write_config(actors={"run_dir": str(tmp_path / "elsewhere")})
    refused = d.cardq("reload")
    assert refused.returncode == 2 and "reload refused by supervisor pid" in refused.stderr
    assert "actors.run_dir changed, which needs a restart" in refused.stderr
    assert proc.poll() is None


def test_a_handler_that_hangs_or_exits_at_import_is_refused_and_the_supervisor_never_stops(deploy):
    # Before: the supervisor imported the new handler itself on SIGHUP: one that slept at import froze it (leases
    # not renewed, a dead worker left a zombie); one that called sys.exit(0) stopped it with exit code 0.
    d = deploy(workers={"count": 1})
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    d.write_config(workers={"handler": "exit_at_import:run"})
    out = d.cardq("reload")
    assert out.returncode == 2 and "importing it raised SystemExit" in out.stderr
    d.write_config(workers={"handler": "hang_at_import:run"})
    os.kill(proc.pid, signal.SIGHUP)
    # While the import hangs in its child, the supervisor goes on: a job submitted now is done.
    [jid] = d.submit([{"sleep": 0}])
    wait_for(lambda: d.job(jid)["status"] == "done", 20, what="a job done during the check")
    info = wait_for(lambda: (d.supervisor_row()["info"] if d.supervisor_row()["info"]["last_reload_error"]
                             and "within" in d.supervisor_row()["info"]["last_reload_error"] else None), 60,
                    what="the hanging import refused")
    assert "importing it did not finish within 10s" in info["last_reload_error"] and info["config_version"] == 1
    assert proc.poll() is None


def test_status_reload_and_stop_work_while_config_toml_is_not_even_toml(deploy, tmp_path):
    # Before, all three exited 2 — the very moment an operator needs them.
    d = deploy(workers={"count": 1}, store={"path": str(tmp_path / "data" / "jobs.db")})
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    running_digest = d.supervisor_row()["info"]["config_digest"]
    d.config_path.write_text("[workers\ncount = ")  # not TOML at all: the database is named nowhere readable
    status = d.cardq("status", "--json")
    assert status.returncode == 2 and "invalid TOML" in status.stderr
    data = orjson.loads(status.stdout)
    assert data["database"] == str(tmp_path / "data" / "jobs.db")  # found through the supervisor's record
    assert data["supervisor"]["running"] and data["supervisor"]["config_digest"] == running_digest
    reload = d.cardq("reload")
    assert reload.returncode == 2 and "reload refused by supervisor pid" in reload.stderr
    assert "invalid TOML" in reload.stderr
    stop = d.cardq("stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert proc.wait(30) == 0
    assert not d.config_path.with_name("config.toml.running").exists()  # its record goes with it


def test_a_deleted_run_dir_is_put_back_and_no_job_dies_of_it(deploy, tmp_path):
    # Before: with run_dir deleted, a restarted actor found no key and crash-looped, and jobs died on "gate: not
    # reachable". The supervisor now puts the folder and the same key back; actors listen anew at their path;
    # a worker that cannot reach its gate meanwhile gives the job back untouched.
    d = deploy(workers={"count": 2, "max_attempts": 2, "backoff_base_s": 0.1, "backoff_max_s": 0.2})
    ids = d.submit([{"sleep": 0.02} for _ in range(300)])
    proc = d.start()
    run_dir = d.loaded.run_dir
    wait_for(lambda: d.statuses(ids).get("done", 0) >= 20, 60, what="work under way")
    # Every actor up first (workers no longer need one to run jobs: 20 can be done before the actors listen).
    names = ("counter-0", "paths-0", "ratelimit-0")
    wait_for(lambda: all((run_dir / f"{name}.sock").exists() for name in names), 60, what="the actors listening")
    actors = wait_for(lambda: (a := {r["name"]: r["pid"] for r in d.db.read(store_processes.read)
                                     if r["role"] == "actor" and r["pid"]}) and len(a) == 3 and a, 30,
                      what="the actors' pids published")
    shutil.rmtree(run_dir)
    os.kill(actors.pop("ratelimit-0"), signal.SIGKILL)  # and the gate's actor restarts into the empty folder
    wait_for(lambda: d.statuses(ids).get("done", 0) == 300, 120, what="every job done")
    assert d.statuses(ids) == {"done": 300}  # none dead for the missing folder
    assert (run_dir / "cardq.key").stat().st_mode & 0o777 == 0o600
    wait_for(lambda: all((run_dir / f"{name}.sock").exists() for name in [*actors, "ratelimit-0"]), 30,
             what="every actor listening again (they look for their socket file every few seconds)")
    now = {r["name"]: r for r in d.db.read(store_processes.read) if r["role"] == "actor" and r["pid"]}
    assert {name: now[name]["pid"] for name in actors} == actors  # the others never died: they listen anew
    assert now["ratelimit-0"]["restarts"] <= 3  # restarted, not crash-looping
    wait_for(lambda: any(e.get("event") == "run_dir.restored" for e in d.log_lines()), 30, what="logged")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_sighup_scales_workers_3_1_4_without_losing_a_job(deploy, tmp_path):
    d = deploy(workers={"count": 3})
    ids = d.submit([{"sleep": 0.2} for _ in range(40)])
    proc = d.start()

    def live_workers():
        return sorted(w["name"] for w in d.workers() if w["pid"])

    wait_for(lambda: live_workers() == ["worker-1", "worker-2", "worker-3"], 30)
    for count, names in ((1, ["worker-1"]), (4, ["worker-1", "worker-2", "worker-3", "worker-4"])):
        d.write_config(workers={"count": count})
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda names=names: live_workers() == names, 30, what=f"{count} workers")
        info = d.supervisor_row()["info"]
        assert info["workers_desired"] == count and info["last_reload_error"] is None
    wait_for(lambda: d.statuses(ids) == {"done": 40}, 60, what="every job done")
    assert all(d.job(i)["attempts"] == 1 for i in ids)  # scaling down lost no in-flight job
    def both_reloads() -> list | None:  # logged by the supervisor's writer thread: asynchronously
        lines = [line for line in d.log_lines() if line["event"] == "config.reloaded"]
        return lines if len(lines) >= 2 else None

    reloaded = wait_for(both_reloads, 30, what="both reloads logged")
    assert reloaded[0]["changes"] == {"workers.count": [3, 1]} and reloaded[1]["version"] == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_handler_past_its_timeout_is_retried_then_dead(deploy):
    d = deploy(workers={"count": 1, "job_timeout_s": 0.3, "max_attempts": 2})
    [polite, stubborn] = d.submit([{"sleep": 5}, {"stubborn": 30}])
    proc = d.start("--burst")
    assert proc.wait(60) == 0, d.output()
    p = d.job(polite)
    assert p["status"] == "dead" and p["attempts"] == 2
    assert all(e["error"].startswith("timeout: the handler ran longer than job_timeout_s=0.3") for e in p["errors"])
    s = d.job(stubborn)  # swallowed the in-process timeout: the supervisor killed its worker, twice
    assert s["status"] == "dead" and s["attempts"] == 2
    assert all("did not return; worker killed" in e["error"] for e in s["errors"])
    kills = [line for line in d.log_lines() if line["event"] == "child.killed"]
    assert len(kills) == 2 and all(k["job_id"] == stubborn for k in kills)


def test_job_that_kills_its_worker_is_dead_after_k_crashes(deploy):
    d = deploy(workers={"count": 1, "max_attempts": 10}, supervisor={"poison_kills": 3})
    [poison, fine] = d.submit([{"exit": 1}, {"n": 1}])
    proc = d.start("--burst")
    assert proc.wait(60) == 0, d.output()
    job = d.job(poison)
    assert job["status"] == "dead" and job["attempts"] == 3
    assert job["last_error"] == "killed its worker 3 times; last: exit code 1"
    assert d.job(fine)["status"] == "done"


def test_restart_intensity_exceeded_exits_non_zero(deploy):
    d = deploy(workers={"count": 1, "max_attempts": 100},
               supervisor={"poison_kills": 100, "max_restarts": 3, "max_seconds": 60.0})
    d.submit([{"exit": 3} for _ in range(10)])
    proc = d.start()
    assert proc.wait(60) == 4, d.output()
    stops = [line for line in d.log_lines() if line["event"] == "supervisor.stopping"]
    assert "restart intensity exceeded: 4 restarts within 60s (max_restarts=3)" in stops[0]["reason"]


def test_every_log_line_names_its_process_and_job(deploy):
    d = deploy(workers={"count": 1})
    ids = d.submit([{"n": 1}, {"fail": "nope", "permanent": True}])
    assert d.start("--burst").wait(60) == 0
    lines = d.log_lines()
    assert lines and all({"role", "pid", "event", "level", "timestamp"} <= line.keys() for line in lines)
    roles = {line["role"] for line in lines}
    assert roles == {"supervisor", "worker", "actor"}
    failed = [line for line in lines if line["event"] == "job.failed"]
    assert failed and failed[0]["job_id"] == ids[1] and failed[0]["next"] == "dead"
    assert failed[0]["error"] == "permanent: nope"


def test_stop_command_and_selftest(deploy):
    d = deploy(workers={"count": 1})
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    st = d.cardq("selftest")
    assert st.returncode == 0, st.stdout
    assert f"ok    supervisor  pid {proc.pid}" in st.stdout
    out = d.cardq("stop")
    assert out.returncode == 0 and "stopped" in out.stdout
    assert proc.wait(5) == 0
    st = d.cardq("selftest")
    assert st.returncode == 1 and "FAIL  supervisor" in st.stdout
    assert d.cardq("reload").returncode == 1


@pytest.mark.timeout(300)
def test_chaos_random_worker_kills_lose_nothing(deploy, tmp_path):
    """5,000 jobs with an idempotent side effect; a random worker is SIGKILLed every 100-300 ms until the
    queue drains: every job done exactly once, every side effect present, nothing lost or stuck."""
    rng = random.Random(42)
    side = str(tmp_path / "side.db")
    d = deploy(workers={"count": 3, "max_attempts": 50}, supervisor={"poison_kills": 50, "max_restarts": 10_000},
               log={"level": "info"})
    n = 5000
    # 3 ms a job: ~5 s of work on 3 workers, so that the drain outlasts a good number of kills (batches of the
    # adaptive prefetch drained no-op jobs in under 2 s, with fewer than ten kills)
    ids = d.submit([{"side_db": side, "sleep": 0.003} for _ in range(n)])
    proc = d.start()
    kills = 0
    while d.statuses(ids).get("done", 0) < n:
        assert proc.poll() is None, d.output()
        live = [w["pid"] for w in d.workers() if w["pid"] and w["state"] in ("busy", "idle")]
        if live:
            try:
                os.kill(rng.choice(live), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(rng.uniform(0.1, 0.3))  # the chaos schedule itself (kill every 100-300 ms), not a wait
    assert kills >= 10
    assert d.statuses(ids) == {"done": n}
    side_conn = apsw.Connection(side)
    effects = dict(side_conn.execute("SELECT job_id, runs FROM effects").fetchall())
    side_conn.close()
    assert set(effects) == set(ids)  # every job's side effect present
    done_once = d.db.conn.execute("SELECT count(*) FROM jobs WHERE status = 'done' AND result IS NOT NULL")
    assert done_once.fetchall()[0][0] == n
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.timeout(300)
def test_chaos_kills_of_workers_actors_and_the_supervisor_lose_nothing(deploy, tmp_path):
    """2,000 jobs whose handler appends its job id to a file, under the default gate; random SIGKILLs of
    workers and actors every 100-300 ms, and once of the supervisor itself (then a new one is started): every job
    done exactly once in the database, none stuck, and every repeated side effect explained by a kill between
    the side effect and the commit (at most one per worker kill, three for the supervisor's: its 3 workers)."""
    rng = random.Random(8)
    log = tmp_path / "effects.log"
    d = deploy(workers={"count": 3, "max_attempts": 1000, "prefetch": 1},
               supervisor={"poison_kills": 1000, "max_restarts": 100_000, "restart_backoff_max_s": 0.05},
               actors={"ask_timeout_ms": 1000}, log={"level": "warning"})
    n = 2000
    ids = d.submit([{"append": str(log), "sleep": 0.005} for _ in range(n)])
    proc = d.start()
    kills = {"worker": 0, "actor": 0, "supervisor": 0}
    while (done := d.statuses(ids).get("done", 0)) < n:
        if kills["supervisor"] == 0 and done >= n // 3:
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and, by PDEATHSIG, every child it had
            proc.wait(30)
            kills["supervisor"] += 1
            proc = d.start()
            wait_for(lambda pid=proc.pid: (d.supervisor_row() or {}).get("pid") == pid, 60, what="the new supervisor")
        assert proc.poll() is None, d.output(len(d.procs) - 1)
        rows = [r for r in d.db.read(store_processes.read) if r["role"] != "supervisor" and r["pid"]]
        if rows:
            victim = rng.choice(rows)
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                kills[victim["role"]] += 1
            except ProcessLookupError:
                pass
        time.sleep(rng.uniform(0.1, 0.3))  # the chaos schedule itself, not a wait for a condition
    assert d.statuses(ids) == {"done": n}  # none queued, processing or dead: nothing stuck or lost
    runs = collections.Counter(int(line) for line in log.read_text().split())
    assert set(runs) == set(ids)  # every job's side effect happened
    repeats = sum(c - 1 for c in runs.values())
    assert repeats <= kills["worker"] + 3 * kills["supervisor"], (repeats, kills)
    assert kills["worker"] >= 5 and kills["actor"] >= 3 and kills["supervisor"] == 1, kills
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_reload_with_a_handler_that_does_not_import_is_refused(deploy):
    d = deploy(workers={"count": 1})
    ids = d.submit([{"sleep": 0.05} for _ in range(20)])
    proc = d.start()
    wait_for(lambda: d.supervisor_row(), 30)
    d.write_config(workers={"handler": "handlers_for_tests:behavee"})
    os.kill(proc.pid, signal.SIGHUP)
    info = wait_for(lambda: (d.supervisor_row()["info"] if d.supervisor_row()["info"]["last_reload_error"]
                             else None), 10, what="reload refused")
    assert "has no function behavee" in info["last_reload_error"] and info["config_version"] == 1
    wait_for(lambda: d.statuses(ids) == {"done": 20}, 30, what="jobs still done by the old handler")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_stop_lets_a_gated_job_finish_and_release_its_permit(deploy):
    """A stop lets a job inside the gate finish and give its permit back."""
    d = deploy(workers={"count": 1})
    [jid] = d.submit([{"sleep": 1.0}])
    proc = d.start()
    # Inside the gate = one of its slot locks is held (a worker takes a free slot in its own process). Not
    # busy_worker_on: the processes table is published once a second and can miss a 1 s job altogether.
    slots = GateSlots(d.loaded.run_dir, "generation")
    wait_for(lambda: slots.count_held(4) == 1, 30, what="the job holds its permit")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, d.output()
    assert d.job(jid)["status"] == "done" and d.job(jid)["attempts"] == 1
    assert slots.count_held(4) == 0
    slots.close()


def test_idle_workers_sleep_through_app_traffic_and_wake_for_a_submit(deploy):
    # Before: idle workers were woken whenever any process committed — the actors' rate-limit checks and traffic
    # events included — and the supervisor compared the database's change counter every 2 ms to find out. Now a
    # submit rings a doorbell, and nothing else wakes them.
    d = deploy()
    d.start()

    def idle_row() -> dict | None:
        row = d.supervisor_row()
        workers = d.workers()
        return row if row and len(workers) == 2 and all(w["state"] == "idle" for w in workers) else None

    before = wait_for(idle_row, 60, what="both workers idle")["info"]["wakeups_sent"]
    with cardq.connect(d.config_path, name="app") as q:
        for i in range(500):
            q.ratelimit.check(f"ip:{i % 50}")
            q.counter.incr("hits", 1)
            q.events.record(path=f"/p/{i % 10}", status=200, response_ms=1.0, client_ip="10.0.0.1",
                            request_id=f"r{i}")
        q.events.flush()
        traffic_ended = time.time()
        # Two publishes after the traffic (the table is rewritten once a second): no wake-up was sent for it.
        row = wait_for(lambda: (r := d.supervisor_row()) and r["heartbeat_at"] > traffic_ended + 1.5 and r, 30,
                       what="the supervisor's row published after the traffic")
        assert row["info"]["wakeups_sent"] == before
        [job] = q.submit([{}], user="u1", plan="enterprise").ids
        assert q.wait([job], timeout=60)[0].status == "done"
    row = wait_for(lambda: (r := d.supervisor_row()) and r["info"]["wakeups_sent"] > before and r, 30,
                   what="the wake-up for the submit, published")
    assert row["info"]["wakeups_sent"] <= before + 2  # one ring: each idle worker woken once


def test_auto_prefetch_spreads_slow_jobs_and_batches_fast_ones(deploy):
    # prefetch = "auto" (the default): 6 jobs of 1 s on 3 workers are spread, 2 each (~2 s in all, never one
    # worker holding all 6 for 6 s, as a fixed prefetch of 32 would); thousands of tiny jobs are claimed many per
    # transaction (claimed_at shared by several jobs shows a batch).
    d = deploy(workers={"count": 3, "prefetch": "auto", "gate": ""})
    slow = d.submit([{"sleep": 1.0}] * 6)
    fast = d.submit([{}] * 3000)
    assert d.cardq("supervise", "--burst", timeout=120).returncode == 0
    runs = collections.Counter(d.job(i)["result"]["pid"] for i in slow)
    assert max(runs.values()) <= 3, runs  # a fixed large prefetch: one worker runs all 6
    claims = d.db.conn.execute(
        f"SELECT count(DISTINCT started_at) FROM jobs WHERE id IN ({','.join(map(str, fast))})").fetchall()[0][0]
    assert claims < 1500, claims  # batched: far fewer claim instants than jobs
