"""What the public Python API costs an app, each figure beside its floor measured in the same run.

    .venv/bin/python benchmarks/bench_api.py

- import time of `cardq` (python -X importtime, the cumulative figure of the top-level import), beside
  `import sqlite3` (the stdlib floor for "a library that talks to SQLite");
- one-item `q.submit` beside the raw floor: the same one-row INSERT in its own BEGIN IMMEDIATE … COMMIT with
  plain apsw on a connection with the same pragmas;
- `q.job(id)` beside a raw one-row SELECT by primary key;
- `q.ratelimit.check` beside the raw socket round trip to the same actor: a pre-encoded check frame sent on a
  plain authenticated multiprocessing.connection and its answer read, no client library in between;
- a submit through the CLI (`cardq submit`, one process per call, as an app without the API had to), for context.

Runs on the config `cardq init` writes (the defaults). A report (exit 0), not a test.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import orjson

import cardq
from cardq import app
from cardq.actors import keys
from cardq.actors.protocol import socket_path
from cardq.store import queries
from cardq.store import submit as store_submit

CARDQ = str(Path(sys.executable).parent / "cardq")
ROUNDS = 3


def import_ms(statement: str) -> float:
    """What `statement` adds to a fresh interpreter's start (ms): best of 7 runs, minus the best bare start.
    (-X importtime's own figures leave out what site imports first, such as pathlib.)"""
    def best(code: str) -> float:
        times = []
        for _ in range(7):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - t)
        return min(times)

    return (best(statement) - best("pass")) * 1000


def per_call_us(fn, n: int) -> float:
    """Median over ROUNDS of the mean µs per call of n calls (after 100 warm-up calls)."""
    for i in range(100):
        fn(i)
    rounds = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        rounds.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(rounds)


def p50_us(fn, n: int) -> tuple[float, float]:
    for i in range(200):
        fn(i)
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def threaded_checks(q, config: Path, *, threads: int, per_thread: int) -> tuple[float, float]:
    """p50/p99 µs of q.ratelimit.check from `threads` threads of this process sharing one Queue, while another
    process checks in a loop (the actor serves other clients too)."""
    other = subprocess.Popen([sys.executable, "-c", (
        "import cardq, time\n"
        f"q = cardq.connect({str(config)!r}, name='other')\n"
        "end = time.monotonic() + 120\n"
        "i = 0\n"
        "while time.monotonic() < end:\n"
        "    q.ratelimit.check(f'other:{i % 500}'); i += 1\n")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: list[float] = []
    lock = threading.Lock()

    def run(t: int) -> None:
        mine = []
        for i in range(per_thread):
            started = time.perf_counter()
            q.ratelimit.check(f"t{t}:{i % 200}")
            mine.append((time.perf_counter() - started) * 1e6)
        with lock:
            times.extend(mine[100:])  # after each thread's connection is made

    try:
        time.sleep(1.0)  # the other app under way
        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        other.kill()
        other.wait()
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-api-"))
    config = root / "config.toml"
    cardq.init(config)
    print("config: the one `cardq init` writes (defaults)\n")

    rows = []
    imp = import_ms("import cardq")
    floor = import_ms("import apsw, msgspec, orjson, tomllib, multiprocessing.connection")
    rows.append(("import cardq", f"{imp:.0f} ms", f"{floor:.0f} ms (import of its dependencies)",
                 f"{imp / floor:.1f}x"))

    q = cardq.connect(config, name="bench")
    db_path = q.config.db_path
    raw = apsw.Connection(str(db_path))
    raw.setbusytimeout(5000)
    for pragma in ("journal_mode=WAL", "synchronous=1", "foreign_keys=ON"):
        raw.execute(f"PRAGMA {pragma}").fetchall()
    raw.execute("CREATE TABLE IF NOT EXISTS raw_jobs (id INTEGER PRIMARY KEY, user_id TEXT, payload TEXT)")

    def raw_insert(i: int) -> None:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO raw_jobs (user_id, payload) VALUES (?, ?)", (f"u{i % 50}", '{"title":"Mug"}'))
        raw.execute("COMMIT")

    item = [{"title": "Mug"}]
    ids: list[int] = []
    api = per_call_us(lambda i: ids.extend(q.submit(item, user=f"u{i % 50}", plan="enterprise").ids), 2000)
    floor = per_call_us(raw_insert, 2000)
    rows.append(("q.submit, 1 item", f"{api:.0f} µs", f"{floor:.0f} µs (1-row INSERT tx)", f"{api / floor:.1f}x"))

    # The layer below the API, on its own connection: what the API adds to the store's own work.
    db = app.open_db(q.config)
    configured, attempts = q.config.limit_values(), q.config.config.workers.max_attempts
    store_us = per_call_us(lambda i: store_submit.submit(db, [store_submit.NewJob(b'{"title":"Mug"}')],
                                                        user_id=f"w{i % 50}", plan="enterprise",
                                                        max_attempts=attempts, configured=configured), 2000)
    rows.append(("q.submit, 1 item, over the store's submit", f"{api:.0f} µs", f"{store_us:.0f} µs (store.submit)",
                 f"{api / store_us:.2f}x"))

    api = per_call_us(lambda i: q.job(ids[i % len(ids)]), 5000)
    floor = per_call_us(lambda i: raw.execute("SELECT * FROM jobs WHERE id = ?", (ids[i % len(ids)],)).fetchall(),
                        5000)
    rows.append(("q.job(id)", f"{api:.0f} µs", f"{floor:.0f} µs (SELECT by id)", f"{api / floor:.1f}x"))
    store_us = per_call_us(lambda i: queries.get(db, ids[i % len(ids)]), 5000)
    rows.append(("q.job(id), over the store's get", f"{api:.0f} µs", f"{store_us:.0f} µs (queries.get)",
                 f"{api / store_us:.2f}x"))
    db.close()

    proc = subprocess.Popen([CARDQ, "supervise", "--workers", "0"], cwd=root,
                            env={**os.environ, "CARDQ_CONFIG": str(config)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_dir = q.config.run_dir
        deadline = time.monotonic() + 60
        while not socket_path(run_dir, "ratelimit", 0).exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the rate limiter did not start"
            time.sleep(0.05)
        conn = mpc.Client(str(socket_path(run_dir, "ratelimit", 0)), family="AF_UNIX",
                          authkey=keys.authkey(keys.load_secret(run_dir)))
        conn.send_bytes(orjson.dumps({"pid": os.getpid(), "name": "raw"}))

        def raw_check(i: int) -> None:
            conn.send_bytes(b'{"id":%d,"op":"check","a":{"key":"raw:%d","cost":1}}' % (i, i % 1000))
            orjson.loads(conn.recv_bytes())

        api50, api99 = p50_us(lambda i: q.ratelimit.check(f"api:{i % 1000}"), 5000)
        raw50, raw99 = p50_us(raw_check, 5000)
        rows.append(("q.ratelimit.check p50", f"{api50:.0f} µs", f"{raw50:.0f} µs (raw socket round trip)",
                     f"{api50 / raw50:.2f}x"))
        rows.append(("q.ratelimit.check p99", f"{api99:.0f} µs", f"{raw99:.0f} µs", f"{api99 / raw99:.2f}x"))
        t50, t99 = threaded_checks(q, config, threads=8, per_thread=2000)
        rows.append(("q.ratelimit.check from 8 threads, another app checking too, p50 / p99 (target <= 100 µs / "
                     "<= 1 ms)", f"{t50:.0f} µs / {t99:.0f} µs", f"{api50:.0f} µs / {api99:.0f} µs (1 thread)",
                     f"{t50 / api50:.2f}x / {t99 / api99:.2f}x"))
        conn.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)

    items = root / "one.jsonl"
    items.write_text('{"title": "Mug"}\n')
    t = time.perf_counter()
    for i in range(10):
        subprocess.run([CARDQ, "submit", str(items), "--user", f"cli{i}", "--plan", "enterprise", "-q"],
                       cwd=root, env={**os.environ, "CARDQ_CONFIG": str(config)}, capture_output=True, check=True)
    cli = (time.perf_counter() - t) / 10 * 1e6
    api = per_call_us(lambda i: q.submit(item, user=f"v{i % 50}", plan="enterprise"), 500)
    rows.append(("submit via the CLI (a process per call)", f"{cli / 1000:.0f} ms", f"{api:.0f} µs (q.submit)",
                 f"{cli / api:.0f}x slower"))
    q.close()
    raw.close()

    width = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("figure", "cardq", "floor, same run", "ratio")
    width = [max(w, len(h)) for w, h in zip(width, header, strict=True)]
    for r in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))


if __name__ == "__main__":
    main()
