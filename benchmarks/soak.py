"""Soak: cardq on the config `cardq init` writes, under sustained load, watched every 5 s.

    .venv/bin/python benchmarks/soak.py               # 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 2   # shorter
    .venv/bin/python benchmarks/soak.py --fast        # the same with the gate off and prefetch 32

Load: a submitter keeps ~2,000 jobs queued (the built-in card handler, offline); an app process checks rate
limits and records traffic events at a steady rate; a reader holds one read transaction for 60 s (a fifth of a
short run) twice during the run. Every 5 s: WAL and database size, RSS and CPU of every cardq process,
throughput of jobs, checks and events, enqueue -> start latency of a probe job. At the end, a verdict per bound:
WAL bounded (64 MiB + what one step of the checkpointer can let in), no growth of private memory (a leak),
throughput not decaying, latency steady. A report (exit 0), not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cardq
from cardq.actors.protocol import socket_path
from cardq.store import Database

CARDQ = str(Path(sys.executable).parent / "cardq")
SAMPLE_S = 5.0
WAL_BOUND = 64 * 2**20


def app_load(config: str, stop_at: float, counts) -> None:
    """An app on the VM: rate-limit checks and traffic events at a steady rate (~1,000 of each a second)."""
    q = cardq.connect(config, name="soak-app")
    i = 0
    while time.time() < stop_at:
        started = time.monotonic()
        for _ in range(50):
            i += 1
            try:
                q.ratelimit.check(f"ip:10.0.{i % 250}.{i % 7}")
                counts[0] += 1
            except cardq.Error:
                pass
            q.events.record(path=f"/cards/{i % 500}", status=200 if i % 20 else 503, response_ms=5.0 + i % 40,
                            client_ip=f"10.0.{i % 250}.{i % 7}", request_id=str(i))
            counts[1] += 1
        time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))
    q.close()


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(RSS MiB, private RSS MiB, CPU seconds) of one process, from /proc. Private (RssAnon) is the process's own
    heap: what a leak grows. RSS also counts shared mappings, such as SQLite's WAL index (-shm), which every
    process maps and which grows with the WAL while a long read pins it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0, 0.0
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
           if line.startswith(("VmRSS:", "RssAnon:"))}
    ticks = os.sysconf("SC_CLK_TCK")
    return kib.get("VmRSS", 0) / 1024, kib.get("RssAnon", 0) / 1024, (int(fields[11]) + int(fields[12])) / ticks


def tree(root_pid: int) -> dict[str, int]:
    """name -> pid of the supervisor and its children (by their process title in the processes table)."""
    out = {"supervisor": root_pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == root_pid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[f"child-{entry.name}" if "resource_tracker" not in cmd else "resource-tracker"] = int(entry.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fast", action="store_true", help="gate off and prefetch 32 (what the fast path needs)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cardq-soak-"))
    config = root / "config.toml"
    cardq.init(config)
    if args.fast:
        text = config.read_text().replace('gate = "generation"', 'gate = ""').replace("prefetch = 1", "prefetch = 32")
        config.write_text(text)
    q = cardq.connect(config, name="soak")
    for key, value in (("batch_max_queued_per_user", 100_000), ("daily.enterprise", 10**9)):
        q.set_limit(key, value)
    duration = args.minutes * 60
    print(f"soak: {args.minutes:g} min on {'the --fast variant of ' if args.fast else ''}the config `cardq init` "
          f"writes, in {root}")
    sup = subprocess.Popen([CARDQ, "supervise"], cwd=root, env={**os.environ, "CARDQ_CONFIG": str(config)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = q.config.run_dir
    while not all(socket_path(run_dir, a, 0).exists() for a in ("counter", "ratelimit", "paths")):
        time.sleep(0.1)
    stop_at = time.time() + duration
    counts = mp.get_context("spawn").Array("d", 2, lock=False)
    app = mp.get_context("spawn").Process(target=app_load, args=(str(config), stop_at, counts))
    app.start()

    item = {"title": "Ceramic mug 350 ml", "category": "home", "marketplace": "ozon", "style": "selling"}
    fed = {"n": 0}

    def feed() -> None:  # keep ~2,000 queued: the workers never run dry
        user = 0
        while time.time() < stop_at:
            if q.pending() < 2000:
                user += 1
                fed["n"] += len(q.submit([item] * 200, user=f"u{user % 50}", plan="enterprise").ids)
            else:
                time.sleep(0.05)

    reads: list[tuple[float, float]] = []  # (start, end) of each long read, seconds into the run

    def long_reads() -> None:  # two reads pinning one snapshot for 60 s (or a fifth of a short run)
        hold = min(60.0, duration / 5)
        for start in (duration * 0.3, duration * 0.65):
            while time.time() < stop_at - duration + start:
                time.sleep(0.5)
            db = Database.open(q.config.db_path)
            began = time.time() - (stop_at - duration)
            db.read(lambda c, hold=hold: (c.execute("SELECT count(*) FROM jobs").fetchall(), time.sleep(hold)))
            reads.append((began, time.time() - (stop_at - duration)))
            db.close()

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=long_reads, daemon=True)]
    for t in threads:
        t.start()
    db = Database.open(q.config.db_path)
    rows, last = [], None
    header = (f"{'t s':>5} {'WAL MiB':>8} {'db MiB':>7} {'jobs/s':>7} {'checks/s':>9} {'events/s':>9} "
              f"{'enq->start ms':>13} {'RSS MiB (sum)':>13} {'private':>7} {'CPU %':>6}")
    print(header)
    while time.time() < stop_at:
        time.sleep(SAMPLE_S)  # the sampling period of a report, not a wait for a condition
        now = time.monotonic()
        done = db.read(lambda c: c.execute("SELECT count(*) FROM jobs WHERE status = 'done'").fetchall()[0][0])
        procs = tree(sup.pid)
        stats = [proc_stats(pid) for pid in procs.values()]
        rss, private, cpu = (sum(s[i] for s in stats) for i in range(3))
        probe = q.submit([item], user="probe", plan="enterprise").ids[0]
        t0 = time.time()
        while q.job(probe).started_at is None and time.time() - t0 < 30:
            time.sleep(0.002)  # measuring the probe's start, not waiting on a condition to pass a test
        job = q.job(probe)
        # (created_at is stamped before the submit takes the write lock, started_at before the claim does: a
        # claim waiting on that very submit can stamp a few ms earlier; that is 0 here)
        latency = max(0.0, ((job.started_at or time.time()) - job.created_at) * 1000)
        sample = {"t": time.time() - (stop_at - duration), "wal": db.wal_bytes() / 2**20,
                  "db": q.config.db_path.stat().st_size / 2**20, "done": done, "checks": counts[0],
                  "events": counts[1], "rss": rss, "private": private, "cpu": cpu, "mono": now, "latency": latency}
        if last is not None:
            dt = sample["mono"] - last["mono"]
            sample.update(jobs_s=(done - last["done"]) / dt, checks_s=(counts[0] - last["checks"]) / dt,
                          events_s=(counts[1] - last["events"]) / dt, cpu_pct=(cpu - last["cpu"]) / dt * 100)
            rows.append(sample)
            print(f"{sample['t']:5.0f} {sample['wal']:8.1f} {sample['db']:7.1f} {sample['jobs_s']:7.0f} "
                  f"{sample['checks_s']:9.0f} {sample['events_s']:9.0f} {latency:13.1f} {rss:13.0f} "
                  f"{private:7.0f} {sample['cpu_pct']:6.0f}")
        last = sample
    app.join(60)
    os.killpg(sup.pid, signal.SIGTERM)
    sup.wait(120)
    db.close()
    q.close()

    third = max(1, len(rows) // 3)
    warm, first, final = rows[:third], rows[third:2 * third], rows[-third:]
    def in_read(t: float) -> bool:  # during a long read, or the step after it ended
        return any(start <= t <= end + 2 * SAMPLE_S for start, end in reads)

    wal_max = max((r["wal"] for r in rows if not in_read(r["t"])), default=0.0)
    wal_read = max((r["wal"] for r in rows if in_read(r["t"])), default=0.0)
    back = [next((r["wal"] for r in rows if r["t"] > end + 2 * SAMPLE_S), 0.0) for _start, end in reads]
    rss_growth = statistics.median(r["rss"] for r in final) / statistics.median(r["rss"] for r in warm)
    private_growth = statistics.median(r["private"] for r in final) / statistics.median(r["private"] for r in warm)
    step_bound = WAL_BOUND / 2**20 * 1.5  # 64 MiB + what writers add while one checkpoint step is tried
    decay = statistics.median(r["jobs_s"] for r in final) / max(1e-9, statistics.median(r["jobs_s"] for r in first))
    lat_first = statistics.median(r["latency"] for r in first)
    lat_final = statistics.median(r["latency"] for r in final)
    print()
    print(f"WAL bounded:          max {wal_max:.1f} MiB outside the long reads, against {WAL_BOUND / 2**20:.0f} MiB "
          f"+ one step ({step_bound:.0f} MiB)  {'PASS' if wal_max <= step_bound else 'FAIL'}")
    print(f"  during the long reads ({', '.join(f'{s:.0f}-{e:.0f} s' for s, e in reads)}): up to {wal_read:.0f} MiB "
          f"(a reader pins the log); {2 * SAMPLE_S:.0f} s after each: {', '.join(f'{b:.1f}' for b in back)} MiB  "
          f"{'PASS' if all(b <= step_bound for b in back) else 'FAIL'}")
    print(f"no leak:              private memory, last third / first third {private_growth:.2f}  "
          f"{'PASS' if private_growth <= 1.10 else 'FAIL'}  (RSS with shared mappings: {rss_growth:.2f})")
    print(f"throughput steady:    jobs/s last third / middle third {decay:.2f}  {'PASS' if decay >= 0.8 else 'FAIL'}")
    print(f"latency steady:       enqueue->start median {lat_first:.1f} ms -> {lat_final:.1f} ms  "
          f"{'PASS' if lat_final <= max(2 * lat_first, lat_first + 20) else 'FAIL'}")
    print(f"totals: {fed['n']:,} jobs fed, {int(counts[0]):,} rate-limit checks, {int(counts[1]):,} events")


if __name__ == "__main__":
    main()
