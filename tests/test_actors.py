"""The actors with real processes: a supervisor running Counter, RateLimiter and PathCollector shards, real
client processes, real SIGKILLs. Every wait is a condition with a deadline."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import socket
import struct
import time
from collections import defaultdict
from multiprocessing.connection import AuthenticationError
from multiprocessing.connection import Client as RawClient
from pathlib import Path

import datasketches as ds
import orjson
import pytest

from cardq.actors import keys, protocol
from cardq.actors.client import ActorClient
from cardq.actors.protocol import socket_path
from cardq.config import load_config
from cardq.errors import ActorError, ActorUnavailable, InvalidRequest
from cardq.store import processes as store_processes

import actor_clients
from conftest import wait_for
from supervision import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CTX = mp.get_context("spawn")


@pytest.fixture
def make(tmp_path):
    made: list[Deployment] = []

    def factory(**overrides) -> Deployment:
        overrides.setdefault("workers", {"count": 0})
        overrides.setdefault("supervisor", {"max_restarts": 10_000, "restart_backoff_max_s": 0.05})
        d = Deployment(tmp_path, **overrides)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.close()


def up(d: Deployment, *names: str) -> ActorClient:
    """Start the supervisor, wait until the named actors listen, and return a client."""
    d.start()
    loaded = load_config(d.config_path)
    wait_for(lambda: all(socket_path(loaded.run_dir, *n.rsplit("-", 1)[:1], int(n.rsplit("-", 1)[1])).exists()
                         for n in names), 30, what=f"actors {names} listening")
    return ActorClient.from_config(loaded, name="test")


def actor_pid(d: Deployment, name: str) -> int:
    return wait_for(lambda: next((r["pid"] for r in d.db.read(store_processes.read)
                                  if r["name"] == name and r["pid"]), None), 30, what=f"{name} pid")


def kill_at_progress(d: Deployment, actor: str, procs: list, progress, points: tuple[float, ...]) -> int:
    """SIGKILL the actor each time the clients' work passes one of `points` (fractions of it done), until every
    client process has finished cleanly; returns how many kills landed. Kills land at the same stages of the
    work however fast or loaded the machine is (a timed schedule lands fewer kills when the work runs fast)."""
    name, shard = actor.rsplit("-", 1)
    spotter = ActorClient.from_config(load_config(d.config_path), name="spotter")
    kills, pending = 0, list(points)
    while any(p.is_alive() for p in procs):
        if pending and progress() >= pending[0]:
            try:
                os.kill(live_pid(spotter, name, int(shard)), signal.SIGKILL)
                kills += 1
                pending.pop(0)
            except (ProcessLookupError, ActorError, OSError, EOFError):
                spotter._forget(name, int(shard))  # it was the one just killed: ask the restarted one next time
        time.sleep(0.01)  # polling the progress, a condition
    spotter.close()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return kills


def live_pid(client: ActorClient, actor: str, shard: int) -> int:
    """The pid of the process listening on the actor's socket now, from the kernel (SO_PEERCRED) on a fresh
    connection: exact at once, where the published process table is a snapshot up to a second old."""
    client._forget(actor, shard)
    conn = client._link(actor, shard, time.monotonic() + 30)
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    finally:
        sock.close()


def read_json(path: str) -> dict:
    return orjson.loads(Path(path).read_bytes())


def spawn(target, *args) -> mp.process.BaseProcess:
    p = CTX.Process(target=target, args=args)
    p.start()
    return p


def test_counter_exactly_once_while_the_actor_is_killed(make, tmp_path):
    """100,000 increments from 4 processes while the counter actor is SIGKILLed at random: the value is exact."""
    d = make()
    client = up(d, "counter-0")
    outs = [str(tmp_path / f"incr-{i}.json") for i in range(4)]
    procs = [spawn(actor_clients.incr_loop, str(d.config_path), "hits", 25_000, 100, out) for out in outs]
    watcher = ActorClient.from_config(load_config(d.config_path), name="watcher")

    def done() -> float:
        try:
            return watcher.counter.get("hits") / 100_000
        except ActorError:  # the actor is restarting
            return 0.0

    kills = kill_at_progress(d, "counter-0", procs, done, (0.15, 0.35, 0.55, 0.75))
    watcher.close()
    assert kills == 4
    assert client.counter.get("hits") == 100_000
    retried = sum(read_json(o)["retries"] for o in outs)
    assert retried >= 1  # some asks really were cut off by a kill and sent again
    client.close()


def test_counter_incr_if_below_and_the_usage_number(make):
    d = make()
    client = up(d, "counter-0")
    assert client.counter.incr_if_below("seats", 3, 5, op_id="a") == {"ok": True, "value": 3}
    assert client.counter.incr_if_below("seats", 3, 5, op_id="b") == {"ok": False, "value": 3}
    assert client.counter.incr_if_below("seats", 3, 5, op_id="a") == {"ok": True, "value": 3}  # a retry of "a"
    d.submit([{"n": 1}, {"n": 2}], user="ann", plan="free")  # 2 jobs queued for ann
    assert client.counter.get("usage:ann") == 0
    # An app making cards outside the queue moves the same number the daily plan limit reads (free: 5/day):
    assert client.counter.incr_if_below("usage:ann", 3, 5)["ok"]  # 0 done + 2 active + 3 <= 5
    assert not client.counter.incr_if_below("usage:ann", 1, 5)["ok"]
    with pytest.raises(Exception, match="plan free allows 5 a day"):
        d.submit([{"n": 3}], user="ann", plan="free")
    client.close()


def test_rate_limit_policy_and_state_survive_an_actor_restart(make):
    d = make(ratelimit={"policies": {"t:*": {"limit": 5, "window_s": 10.0, "burst": 5}}})
    client = up(d, "ratelimit-0")
    answers = client.ratelimit.check_many(["t:1"] * 6)
    assert [a["allowed"] for a in answers] == [True] * 5 + [False]
    assert answers[4]["remaining"] == 0 and 1.9 < answers[5]["retry_after_s"] <= 2.0  # one every 2 s
    assert client.ratelimit.check("other")["limit"] == 60  # the default policy
    os.kill(actor_pid(d, "ratelimit-0"), signal.SIGKILL)
    assert client.ratelimit.check("t:1")["allowed"] is False  # its TAT was committed before it answered
    with pytest.raises(ActorError, match="cost 6: expected 1 to 5"):
        client.ratelimit.check("t:1", cost=6)
    client.close()


def test_gate_bounds_concurrency_and_counts_overflow(make, tmp_path):
    """20 concurrent acquirers, max 4 at once and 8 waiting: never more than 4 inside; the rest overloaded."""
    d = make(gates={"t": {"max_concurrency": 4, "max_queue": 8, "queue_timeout_ms": 20_000}})
    client = up(d, "ratelimit-0")
    outs = [str(tmp_path / f"gate-{i}.json") for i in range(20)]
    procs = [spawn(actor_clients.hold_gate, str(d.config_path), "t", 1.0, out) for out in outs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [read_json(o) for o in outs]
    inside = [r for r in results if "enter" in r]
    overloaded = [r for r in results if "overloaded" in r]
    assert len(inside) + len(overloaded) == 20 and len(inside) >= 12
    events = sorted([(r["enter"], 1) for r in inside] + [(r["exit"], -1) for r in inside], key=lambda e: (e[0], e[1]))
    level, peak = 0, 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 4
    stats = client.ratelimit.gate_stats()["t"]
    assert stats["dropped_since_boot"] == len(overloaded) and stats["active"] == 0
    assert stats["max_concurrency"] == 4 and stats["p95_wait_ms"] > 500  # queued acquirers really waited
    client.close()


def test_permits_of_a_killed_holder_come_back(make, tmp_path):
    d = make(gates={"t": {"max_concurrency": 1, "max_queue": 4, "queue_timeout_ms": 20_000}})
    client = up(d, "ratelimit-0")
    ready = tmp_path / "held"
    holder = spawn(actor_clients.hold_gate, str(d.config_path), "t", 60.0, str(tmp_path / "h.json"), str(ready))
    wait_for(ready.exists, 30, what="permit held")
    assert client.ratelimit.gate_stats()["t"]["active"] == 1
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    with client.gate("t"):  # waits in the queue until the dead holder's permit is released
        assert client.ratelimit.gate_stats()["t"]["active"] == 1
    client.close()


def _events(n_unique: int, dup_share: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Unique events over 12 paths and 6 past hours, then duplicates and replays, shuffled (out of order)."""
    base = int(time.time() * 1000) - 7 * 3_600_000  # recent: inside the detail retention (3 days)
    unique = []
    for i in range(n_unique):
        path = f"/cards/{i % 12}/view" if i % 3 else f"/api/v{i % 4}/items?page={i}"
        unique.append({"path": path, "status": rng.choice([200] * 8 + [404, 503]),
                       "response_ms": round(rng.lognormvariate(3, 0.8), 3), "client_ip": f"10.{i % 9}.{i % 211}.1",
                       "request_id": f"r{i}", "ts_ms": base + rng.randrange(6 * 3_600_000),
                       "bytes": rng.randrange(5000)})
    dups = [dict(rng.choice(unique)) for _ in range(int(n_unique * dup_share / (1 - dup_share)))]
    everything = unique + dups
    rng.shuffle(everything)
    return unique, everything


def test_path_collector_counts_equal_ground_truth_despite_duplicates_and_kills(make, tmp_path):
    """200,000 events, 30% duplicates and replays, past hours out of order, the collector SIGKILLed mid-batch
    at random: every count equals the ground truth from the unique events; p95 within the sketch's error bound;
    unique clients within 2%."""
    d = make(actors={"ask_timeout_ms": 1000})
    client = up(d, "paths-0")
    rng = random.Random(11)
    unique, everything = _events(140_000, 0.30, rng)
    assert len(everything) == 200_000
    chunks = [everything[i::2] for i in range(2)]
    outs = [str(tmp_path / f"ev-{i}.json") for i in range(2)]
    procs = [spawn(actor_clients.send_events, str(d.config_path), chunk, out) for chunk, out in zip(chunks, outs,
                                                                                                     strict=True)]
    stored = lambda: d.db.conn.execute("SELECT count(*) FROM traffic_events").fetchall()[0][0] / len(unique)  # noqa: E731
    kills = kill_at_progress(d, "paths-0", procs, stored, (0.2, 0.5))
    assert kills == 2
    wait_for(lambda: d.db.conn.execute("SELECT count(*) FROM traffic_inbox").fetchall()[0][0] == 0, 60,
             what="inbox drained")
    truth: dict[tuple[int, str], dict] = defaultdict(lambda: {"n": 0, "4xx": 0, "5xx": 0, "bytes": 0, "ms": [],
                                                              "clients": set()})
    from cardq.actors.traffic import PathNormalizer

    normalize = PathNormalizer(load_config(d.config_path).config.paths.id_rules)
    for e in unique:
        t = truth[(e["ts_ms"] // 3_600_000 * 3600, normalize(e["path"]))]
        t["n"] += 1
        t["4xx"] += 400 <= e["status"] < 500
        t["5xx"] += e["status"] >= 500
        t["bytes"] += e["bytes"]
        t["ms"].append(e["response_ms"])
        t["clients"].add(e["client_ip"])
    assert d.db.conn.execute("SELECT count(*) FROM traffic_events").fetchall()[0][0] == len(unique)
    rows = d.db.conn.execute("SELECT hour, path, requests, status_4xx, status_5xx, bytes, ms_sum, latency, clients"
                             " FROM path_stats_hourly").fetchall()
    assert {(r[0], r[1]) for r in rows} == set(truth)
    for hour, path, req, s4, s5, by, ms_sum, lat, cli in rows:
        t = truth[(hour, path)]
        assert (req, s4, s5, by) == (t["n"], t["4xx"], t["5xx"], t["bytes"]), (hour, path)
        assert ms_sum == pytest.approx(sum(t["ms"]), rel=1e-9)
        kll = ds.kll_floats_sketch.deserialize(lat)
        p95 = kll.get_quantile(0.95)
        ms = sorted(t["ms"])
        rank = sum(1 for v in ms if v <= p95) / len(ms)
        assert abs(rank - 0.95) <= kll.normalized_rank_error(False) + 1 / len(ms), (path, rank)
        uniques = ds.hll_sketch.deserialize(cli).get_estimate()
        assert abs(uniques - len(t["clients"])) <= 0.02 * len(t["clients"]), (path, uniques, len(t["clients"]))
    client.close()


def test_events_wait_in_the_inbox_while_the_collector_is_down(make, tmp_path):
    d = make(actors={"ask_timeout_ms": 300})
    from cardq.store import Database

    Database.open(d.loaded.db_path, create=True).close()
    keys.ensure_run_dir(d.loaded.run_dir)
    client = ActorClient.from_config(load_config(d.config_path), name="test")
    for i in range(50):
        client.events.record(path=f"/x/{i % 5}", status=200, response_ms=1.0, client_ip="1.1.1.1", request_id=str(i))
    assert client.events.flush(30) and client.events.to_inbox == 50 and client.events.sent == 0
    assert d.db.conn.execute("SELECT count(*) FROM traffic_inbox").fetchall()[0][0] == 50
    d.start()  # the collector comes back and drains the inbox
    wait_for(lambda: d.db.conn.execute("SELECT count(*) FROM traffic_inbox").fetchall()[0][0] == 0, 30)
    total = d.db.conn.execute("SELECT sum(requests) FROM path_stats_hourly WHERE path = '/x/:id'").fetchall()
    assert total[0][0] == 50
    client.close()


def test_sampling_scales_counts_and_marks_them_estimates(make):
    d = make(paths={"sampling_rate": 0.5})
    client = up(d, "paths-0")
    for i in range(4000):
        client.events.record(path="/s", status=200, response_ms=1.0, client_ip=str(i), request_id=str(i),
                             ts_ms=int(time.time() * 1000) - 60_000 + i)
    assert client.events.flush(60)
    kept = d.db.conn.execute("SELECT count(*) FROM traffic_events").fetchall()[0][0]
    requests, estimated = d.db.conn.execute("SELECT requests, estimated FROM path_stats_hourly").fetchall()[0]
    assert 1800 < kept < 2200 and requests == kept * 2 and estimated == 1
    from cardq.actors.paths import read_stats

    [row] = read_stats(d.db, path="/s")
    assert row["estimated"] and row["requests"] == kept * 2 and row["p50_ms"] == 1.0
    assert abs(row["unique_clients"] - kept) <= 0.02 * kept
    client.close()


def test_gateway_refuses_bad_clients_without_disturbing_the_others(make, tmp_path):
    d = make()
    client = up(d, "counter-0")
    path = str(socket_path(d.loaded.run_dir, "counter", 0))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(d.loaded.run_dir / "cardq.key").st_mode & 0o777) == "0o600"
    good = keys.authkey(keys.load_secret(d.loaded.run_dir))
    client.counter.incr("ok", 1)

    with pytest.raises((AuthenticationError, EOFError, OSError)):  # a wrong key is refused at the handshake
        RawClient(path, family="AF_UNIX", authkey=b"wrong key" * 4)
    silent = socket.socket(socket.AF_UNIX)  # connects and says nothing: must not hold anyone up
    silent.connect(path)
    raw = socket.socket(socket.AF_UNIX)  # garbage instead of a handshake
    raw.connect(path)
    raw.sendall(os.urandom(4096))
    assert client.counter.incr("ok", 1) == 2

    garbage = RawClient(path, family="AF_UNIX", authkey=good)
    garbage.send_bytes(protocol.encode({"pid": os.getpid()}))
    garbage.send_bytes(b"\x80\x04\x95 a pickle, not JSON")
    with pytest.raises((EOFError, OSError)):
        garbage.recv_bytes()  # the actor closed that connection
    huge = RawClient(path, family="AF_UNIX", authkey=good)
    huge.send_bytes(protocol.encode({"pid": os.getpid()}))
    with pytest.raises((OSError, EOFError)):
        huge.send_bytes(b"x" * 100_000_000)  # 100 MB frame: refused as soon as its length is read
        huge.recv_bytes()
    assert client.counter.incr("ok", 1) == 3  # everyone else still served
    # Log lines reach cardq.log through the supervisor's writer thread: asynchronously.
    wait_for(lambda: len([line for line in d.log_lines() if line["event"] == "gateway.refused"]) >= 3, 30,
             what="three refusals logged")
    silent.close()
    raw.close()
    client.close()


def test_a_message_that_keeps_failing_is_dead_lettered(make):
    d = make()
    client = up(d, "counter-0")
    with pytest.raises(ActorError, match="cannot be sent") as e:
        client.counter.incr("big", 2**70)  # not even JSON: refused before it leaves the client
    assert e.value.code == "bad_request"
    assert client.counter.incr("big", 2**62) == 2**62
    with pytest.raises(ActorError, match="64-bit") as e:  # incr refuses to pass 64 bits: bad input, not a failure
        client.counter.incr("big", 2**62, op_id="over")
    assert e.value.code == "bad_request"
    for attempt in range(1, 4):
        with pytest.raises(ActorError) as e:
            # incr_if_below does not check (yet): 2**63 is too big for SQLite, and its handler raises
            client.counter.incr_if_below("big", 2**62, 2**64 - 1, op_id="same")
        assert e.value.code == ("failed" if attempt < 3 else "dead_letter")
    with pytest.raises(ActorError, match="dead-letter table") as e:
        client.counter.incr_if_below("big", 2**62, 2**64 - 1, op_id="same")
    assert e.value.code == "dead_letter"
    assert client.counter.incr("small", 1) == 1  # the actor kept serving
    rows = d.db.conn.execute("SELECT actor, error FROM actor_dead_letters").fetchall()
    assert rows and rows[0][0] == "counter" and "OverflowError" in rows[0][1]
    client.close()


@pytest.mark.timeout(300)
def test_channel_safety_random_sigkills_under_load(make, tmp_path):
    """SIGKILL a random process of the tree every 50 ms for 20 s under load: no survivor blocks for more than
    1 s (beyond its own ask timeout), every ask either answers or fails with an ActorError."""
    d = make(workers={"count": 2, "handler": "handlers_for_tests:behave", "max_attempts": 1000},
             supervisor={"max_restarts": 100_000, "restart_backoff_max_s": 0.05, "poison_kills": 1000},
             actors={"ask_timeout_ms": 1000})
    d.submit([{"sleep": 0.01} for _ in range(3000)])
    client = up(d, "counter-0", "ratelimit-0", "paths-0")
    stop = tmp_path / "stop"
    outs = [str(tmp_path / f"chaos-{i}.json") for i in range(2)]
    askers = [spawn(actor_clients.ask_forever, str(d.config_path), str(stop), out) for out in outs]
    rng = random.Random(3)
    # At least 20 s and at least 100 kills: on a loaded machine the schedule runs slower, so count kills, not
    # seconds (a hard cap keeps a stuck run from going on forever).
    started = time.monotonic()
    kills = 0
    supervisor = d.procs[0]
    while (time.monotonic() < started + 20 or kills < 100) and time.monotonic() < started + 150:
        rows = [r for r in d.db.read(store_processes.read) if r["role"] != "supervisor" and r["pid"]]
        if rows:
            try:
                os.kill(rng.choice(rows)["pid"], signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.05)  # the kill schedule itself
        assert supervisor.poll() is None, d.output()
    stop.touch()
    for p in askers:
        p.join(30)
        assert p.exitcode == 0  # no asker was wedged
    results = [read_json(o) for o in outs]
    assert kills >= 100
    for r in results:
        assert r["answered"] > 0
        assert r["longest_s"] < 1.0 + 1.0  # the ask timeout (1 s) plus at most 1 s of anything else
    # After the storm, everything answers again: as soon as the last actor killed is back (a restart is a
    # process spawn and its imports, which on a loaded 2-core machine can take longer than one ask's deadline).

    def answered():
        try:
            return client.counter.incr("after", 1, op_id="after-the-storm")
        except ActorUnavailable:
            return None

    assert wait_for(answered, 60, 0.1, "the counter answering after the storm") == 1
    client.close()


def test_cli_reload_and_a_restarted_actor_reached_by_running_workers(make):
    """The actor commands of the CLI; SIGHUP changes a gate live; workers holding the gate around every job
    keep working across a kill of the rate-limit actor, without being restarted themselves."""
    d = make(workers={"count": 2, "handler": "handlers_for_tests:behave"},
             ratelimit={"policies": {"cli:*": {"limit": 1, "window_s": 60.0, "burst": 1}}})
    ids = d.submit([{"sleep": 0.02} for _ in range(200)])
    client = up(d, "counter-0", "ratelimit-0", "paths-0")
    assert d.cardq("counter", "incr", "made", "5").stdout.strip() == "5"
    assert d.cardq("counter", "get", "made").stdout.strip() == "5"
    first, second = d.cardq("ratelimit", "check", "cli:a"), d.cardq("ratelimit", "check", "cli:a")
    assert first.returncode == 0 and first.stdout.startswith("allowed")
    assert second.returncode == 3 and second.stdout.startswith("DENIED")
    rec = d.cardq("event", "record", "--path", "/cards/9?x=1", "--status", "200", "--ms", "12.5", "--ip", "1.2.3.4")
    assert rec.returncode == 0 and rec.stdout.strip().endswith("-> collector")
    gates = orjson.loads(d.cardq("diag", "gates", "--json").stdout)
    assert gates["generation"]["max_concurrency"] == 4

    wait_for(lambda: d.statuses(ids).get("done", 0) >= 20, 30, what="jobs flowing through the gate")
    os.kill(actor_pid(d, "ratelimit-0"), signal.SIGKILL)
    wait_for(lambda: d.statuses(ids) == {"done": 200}, 60, what="every job done across the actor's restart")
    assert all(w["restarts"] == 0 for w in d.workers()), d.workers()

    d.write_config(gates={"generation": {"max_concurrency": 2, "max_queue": 10, "queue_timeout_ms": 5000}})
    assert d.cardq("reload").returncode == 0
    wait_for(lambda: client.ratelimit.gate_stats()["generation"]["max_concurrency"] == 2, 10, what="gate resized")
    status = orjson.loads(d.cardq("status", "--json").stdout)
    assert status["gates"]["generation"]["max_queue"] == 10
    client.close()


def test_bad_events_are_refused_and_a_bad_inbox_row_cannot_crash_the_collector(make):
    d = make()
    client = up(d, "paths-0")
    for args, message in ((["--ms", "nan"], "response_ms nan"), (["--ms", "inf"], "response_ms inf")):
        out = d.cardq("event", "record", "--path", "/x", "--status", "200", *args)
        assert out.returncode == 2 and message in out.stderr
    from cardq.errors import InputError

    with pytest.raises(InputError, match="bytes '12'"):
        client.events.record(path="/x", status=200, response_ms=1.0, bytes="12")
    # A row that is not an event (written by an older client, or by hand) is dead-lettered, not fatal.
    d.db.write(lambda c: c.execute("INSERT INTO traffic_inbox (shard, event) VALUES (0, ?)",
                                   ('{"id": "1", "ts_ms": null}',)))
    wait_for(lambda: d.db.conn.execute("SELECT count(*) FROM traffic_inbox").fetchall()[0][0] == 0, 10)
    assert d.db.conn.execute("SELECT count(*) FROM actor_dead_letters WHERE fingerprint = 'inbox'").fetchall() \
        == [(1,)]
    pid = actor_pid(d, "paths-0")
    client.events.record(path="/after", status=200, response_ms=1.0)
    assert client.events.flush(10) and client.events.sent == 1
    assert actor_pid(d, "paths-0") == pid  # the same collector process: it never went down
    client.close()


def test_gate_leaks_nothing_to_callers_that_gave_up_and_ignores_reused_pids(make, tmp_path):
    d = make(gates={"t": {"max_concurrency": 1, "max_queue": 8, "queue_timeout_ms": 60_000}})
    client = up(d, "ratelimit-0")
    impatient = ActorClient.from_config(load_config(d.config_path), name="impatient")
    impatient.timeout_s = 0.3  # it waits 60 s for the queue, but only 0.3 s on top: make it give up sooner
    with client.gate("t"):
        with pytest.raises(ActorError):
            impatient.ask("ratelimit", "gate:t", "acquire", {"gate": "t", "permit": "p-impatient",
                                                             "wait_ms": 200}, timeout=0.5)
        assert client.ratelimit.gate_stats()["t"]["queued"] == 0  # its place in the queue ended with its wait
    stats = client.ratelimit.gate_stats()["t"]
    assert stats["active"] == 0 and stats["dropped_since_boot"] == 1  # the late permit was never granted
    # A permit row left by a process whose pid now belongs to someone else (pid 1, another start time):
    d.db.write(lambda c: c.execute("INSERT INTO gate_permits VALUES ('stale', 't', 1, 12345, 0)"))
    os.kill(actor_pid(d, "ratelimit-0"), signal.SIGKILL)  # restart: it loads the row, then reaps it
    with client.gate("t"):
        assert client.ratelimit.gate_stats()["t"]["active"] == 1
    impatient.close()
    client.close()


def test_permits_of_a_removed_gate_do_not_stop_the_actor(make):
    d = make()
    d.db.write(lambda c: c.execute("INSERT INTO gate_permits VALUES ('old', 'renamed-away', 1, 1, 0)"))
    client = up(d, "ratelimit-0")
    assert client.ratelimit.check("k")["allowed"]
    assert d.db.conn.execute("SELECT count(*) FROM gate_permits").fetchall()[0][0] == 0
    client.close()


def test_a_trickling_client_does_not_stall_the_actor(make):
    d = make()
    client = up(d, "counter-0")
    good = keys.authkey(keys.load_secret(d.loaded.run_dir))
    slow = RawClient(str(socket_path(d.loaded.run_dir, "counter", 0)), family="AF_UNIX", authkey=good)
    slow.send_bytes(protocol.encode({"pid": os.getpid()}))
    raw = socket.socket(fileno=os.dup(slow.fileno()))
    raw.sendall(b"\x00\x00\x01\x00{")  # a 256-byte frame announced, one byte of it sent
    started = time.monotonic()
    for i in range(50):
        assert client.counter.incr("fast", 1) == i + 1
    assert time.monotonic() - started < 5  # generous: a stalled loop would take 50 x its read timeout
    raw.close()
    slow.close()
    client.close()


def test_an_op_id_reused_for_a_different_request_is_refused(make):
    d = make()
    client = up(d, "counter-0")
    assert client.counter.incr("cards:made", 5, op_id="7f3a") == 5
    assert client.counter.incr("cards:made", 5, op_id="7f3a") == 5  # a retry: the same answer, applied once
    with pytest.raises(InvalidRequest, match=r"op id '7f3a' was used for `incr cards:made 5`; this is "
                                             r"`incr users:signed_up 1`"):
        client.counter.incr("users:signed_up", 1, op_id="7f3a")
    with pytest.raises(InvalidRequest):
        client.counter.incr("cards:made", 6, op_id="7f3a")  # same key, another amount
    assert client.counter.get("users:signed_up") == 0 and client.counter.get("cards:made") == 5
    # The CLI says so in one line, exit 2.
    out = d.cardq("counter", "incr", "users:signed_up", "1", "--op-id", "7f3a")
    assert out.returncode == 2 and "expected a new op id" in out.stderr and out.stderr.count("\n") == 1
    client.close()


@pytest.mark.timeout(240)
def test_an_app_that_leaks_connections_costs_its_idle_ones_not_the_actor(make, tmp_path):
    # The supervisor's tree runs with a hard limit of 256 descriptors. An app opens 400 connections to the
    # counter and never closes them: the actor used to die on EMFILE in accept() (and, restarted, again, until
    # the supervisor gave up). Now the connection idle the longest makes room; the actor never dies, a fresh
    # client is served, and an evicted one is served again on its next ask (it reconnects).
    d = make(actors={"max_connections": 100_000})
    d.max_descriptors = 256
    client = up(d, "counter-0")
    pid = live_pid(client, "counter", 0)
    loaded = load_config(d.config_path)
    leaked = []
    for i in range(400):
        c = ActorClient.from_config(loaded, name=f"leak-{i}")
        c.counter.incr("leaks", 1, op_id=f"leak-{i}")
        leaked.append(c)
    probe = ActorClient.from_config(loaded, name="probe")
    assert probe.counter.get("leaks") == 400
    assert leaked[0].counter.get("leaks") == 400  # evicted long ago: it reconnects and is answered
    assert live_pid(client, "counter", 0) == pid  # the same process throughout
    log = wait_for(lambda: [e for e in d.log_lines() if e.get("event") == "gateway.evicting_idle_connections"], 30,
                   what="the eviction logged")
    assert log[0]["max_connections"] <= 96  # (256 - 64) / 2: the descriptor limit, raised and applied

    def counter_row() -> dict | None:  # `cardq status --json`, once the supervisor has published the count
        got = d.cardq("status", "--json")
        rows = [w for w in orjson.loads(got.stdout)["supervisor"]["workers"] if w["name"] == "counter-0"]
        return rows[0] if rows and rows[0]["connections_evicted"] >= 300 else None

    row = wait_for(counter_row, 30, interval=0.2, what="the evictions in cardq status")
    assert row["connections_evicted"] <= 400 and row["connections_refused"] >= 0
    text = d.cardq("status").stdout
    assert "counter-0: " in text and "idle connections closed to make room" in text
    for c in [*leaked, probe, client]:
        c.close()


def test_an_event_older_than_the_retention_is_refused_as_late_never_counted_twice(make):
    # A replay of an event whose detail row was pruned could not be recognised as a replay: before, it was
    # counted again (requests 1 -> 2). Events older than retention_days are now refused as late.
    d = make(paths={"retention_days": 1.0})
    client = up(d, "paths-0")
    now_ms = int(time.time() * 1000)
    fresh = {"path": "/late", "status": 200, "response_ms": 1.0, "client": "c", "method": "GET",
             "ts_ms": now_ms - 3_600_000, "id": f"{now_ms - 3_600_000:013d}-0000000a", "bytes": None}
    old = {**fresh, "ts_ms": now_ms - 2 * 86_400_000, "id": f"{now_ms - 2 * 86_400_000:013d}-0000000b"}
    answer = client.ask("paths", "/late", "record", {"events": [fresh, old]})
    assert (answer["accepted"], answer["late"], answer["duplicates"]) == (1, 1, 0)
    again = client.ask("paths", "/late", "record", {"events": [fresh, old]})  # a replay of both
    assert (again["accepted"], again["late"], again["duplicates"]) == (0, 1, 1)
    rows = d.db.conn.execute("SELECT hour, requests FROM path_stats_hourly WHERE path = '/late'").fetchall()
    assert [r[1] for r in rows] == [1.0]  # only the fresh one, once
    # (the actor's log line reaches cardq.log through the supervisor's writer: asynchronously)
    wait_for(lambda: any(e.get("event") == "paths.late_events" for e in d.log_lines()), 30, what="the log line")
    client.close()


def test_a_client_that_never_reads_and_slow_handshakes_delay_no_one(make):
    # Before: one client flooding asks without reading its answers blocked the actor's send ~2 s a round (a
    # probe got 8 ActorTimeouts in 15 s), and handshakes trickled one byte at a time held on for 30 s and more.
    d = make()
    client = up(d, "counter-0")
    loaded = load_config(d.config_path)
    path = str(socket_path(loaded.run_dir, "counter", 0))
    flooder = RawClient(path, family="AF_UNIX", authkey=keys.authkey(keys.load_secret(loaded.run_dir)))
    flooder.send_bytes(orjson.dumps({"pid": os.getpid(), "name": "flooder"}))
    tricklers = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    for s in tricklers:
        s.connect(path)
        s.setblocking(False)
    frame = orjson.dumps({"m": [{"id": i, "op": "get", "a": {"key": "k"}} for i in range(1000)]})
    longest, started = 0.0, time.monotonic()
    flood_cut = False
    for i in range(400):
        if not flood_cut:
            try:
                flooder._send(struct.pack("!i", len(frame)) + frame)  # asks, and never a read of an answer
            except OSError:
                flood_cut = True  # the actor hung up on it
        if i % 20 == 0:
            for s in tricklers:
                with contextlib.suppress(OSError):
                    s.send(b"\x00")  # a handshake, one byte at a time
        t = time.monotonic()
        assert client.counter.get("k") == 0
        longest = max(longest, time.monotonic() - t)
    assert longest < 0.5, longest  # no stall of a whole send timeout, let alone several
    assert flood_cut or wait_for(lambda: any("unread" in e.get("reason", "") for e in d.log_lines()), 30,
                                 what="the flooder disconnected")
    # Every trickled handshake was cut off at its 2 s deadline, however busy it kept itself.
    for s in tricklers:
        s.setblocking(True)
        s.settimeout(30)
        with contextlib.suppress(OSError):
            while s.recv(4096):
                pass
        s.close()
    assert time.monotonic() - started < 60
    flooder.close()
    client.close()
