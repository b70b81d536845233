"""Benchmark the HTTP API with a real load generator (wrk, keep-alive, loopback) against a real `cardq supervise`
on the config `cardq init` writes, each hot route beside the same server's GET /healthz rate in the same run.

    apt-get install wrk            # (Debian); then
    .venv/bin/python benchmarks/bench_http.py
    .venv/bin/python benchmarks/bench_http.py --duration 20 --profile /tmp/http-profiles   # py-spy each load

The config is the default one with [http] listen = "127.0.0.1:0" (any free port: the URL is in <run_dir>/http.json);
nothing else is changed (3 workers running the built-in card handler, one shard per actor, 16 HTTP threads), and
the loads stay inside the default limits: each rate-limit check uses a new key (the first check of a key is
always allowed, 60/min being the default policy) and each submit a new user (one job per user: far from the 300
queued and 1,000 a day of the default enterprise plan). Should a default limit refuse the load, that is printed.

Loads (wrk Lua scripts written to a temp dir; one wrk thread, so that wrk takes one core at most):
- GET /healthz: no token, no body — the server's own floor;
- POST /v1/ratelimit/check {"key": new key each time}: target >= 0.5x the /healthz rate, p99 <= 10 ms at 32
  connections;
- POST /v1/events, arrays of 100 events (distinct request ids: none is a duplicate): target >= 50,000 events/s;
- POST /v1/jobs, one item per request, a new user each: target >= 2,000 jobs/s.
Then the HTTP child's CPU with nothing to do (10 s, from schedstat).

wrk, the server, the actors and the workers share the machine's cores (nothing is pinned). A report (exit 0),
not a test: these machines are noisy, compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

import cardq
from cardq.config import load_config

CARDQ = str(Path(sys.executable).parent / "cardq")
PYSPY = next((p for p in ("/tmp/pyspy/bin/py-spy", shutil.which("py-spy")) if p and os.path.exists(p)), None)
EVENTS_PER_REQUEST = 100

# Every script ends with this: one JSON line at the end with what wrk measured (latencies in µs).
DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n', summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50),
    latency:percentile(99), latency.max))
end
"""

# A thread id per wrk thread, so that counters make keys distinct across threads too.
THREADS = r"""
local next_id = 1
setup = function(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end
"""

POST = r"""
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer %(token)s"
wrk.headers["Content-Type"] = "application/json"
local n = 0
"""

# (%-formatted with the token and the run's id: a % of Lua's is written %%)
SCRIPTS = {
    "healthz": "",
    "ratelimit": THREADS + POST + r"""
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"key": "bench:%(run)s:' .. tid .. ':' .. n .. '"}')
end
""",
    "events": THREADS + POST + r"""
local ts = %(ts_ms)d
request = function()
  local parts = {}
  for i = 1, %(per)d do
    n = n + 1
    parts[i] = '{"path": "/cards/' .. (n %% 5000) .. '", "status": 200, "response_ms": ' .. (n %% 97) ..
      '.5, "method": "GET", "client_ip": "10.0.' .. (n %% 256) .. '.' .. (n %% 253) .. '", "request_id": "b' ..
      tid .. '-' .. n .. '", "ts_ms": ' .. (ts + n) .. ', "bytes": 1234}'
  end
  return wrk.format(nil, nil, nil, '[' .. table.concat(parts, ',') .. ']')
end
""",
    "jobs": THREADS + POST + r"""
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"user": "bench-%(run)s-' .. tid .. '-' .. n ..
    '", "plan": "enterprise", "items": [{"title": "Mug", "description": "ceramic, 350 ml"}]}')
end
""",
}

PATHS = {"healthz": "/healthz", "ratelimit": "/v1/ratelimit/check", "events": "/v1/events", "jobs": "/v1/jobs"}


def deployment(root: Path) -> Path:
    """The config.toml `cardq init` writes, [http] listen on a free loopback port: nothing else changed."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.toml"
    subprocess.run([CARDQ, "init", "--config", str(cfg)], cwd=root, check=True, capture_output=True)
    text = cfg.read_text()
    assert 'listen = "127.0.0.1:8787"' in text, "the default [http] listen moved: update this benchmark"
    cfg.write_text(text.replace('listen = "127.0.0.1:8787"', 'listen = "127.0.0.1:0"'))
    return cfg


def start(cfg: Path, out: Path) -> tuple[subprocess.Popen, str, int]:
    """`cardq supervise` in its own session; (process, the HTTP server's URL, the HTTP child's pid) once it
    listens and every actor answers."""
    loaded = load_config(cfg)
    proc = subprocess.Popen([CARDQ, "supervise"], env={**os.environ, "CARDQ_CONFIG": str(cfg)}, cwd=cfg.parent,
                            stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"supervise exited {proc.returncode}: see {out}"
        assert time.monotonic() < deadline, f"the HTTP server did not start: see {out}"
        with contextlib.suppress(OSError, ValueError):
            published = orjson.loads((loaded.run_dir / "http.json").read_bytes())
            with cardq.connect(cfg, name="bench") as q:
                if not any(q.readiness().values()):
                    return proc, published["url"], published["pid"]
        time.sleep(0.2)


def wrk(url: str, name: str, script: Path, *, duration: float, connections: int) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url + PATHS[name]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK ")), None)
    assert line is not None, f"wrk said: {done.stdout}{done.stderr}"
    r = orjson.loads(line[4:])
    r["rate"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
    return r


def profile(pid: int, seconds: float, target: Path) -> subprocess.Popen | None:
    if PYSPY is None:
        return None
    return subprocess.Popen([PYSPY, "record", "-o", str(target), "--pid", str(pid), "--duration", f"{seconds:g}",
                             "--nonblocking", "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, to the nanosecond (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured load")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of each load before it is measured")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every load (ranges shown; each ratio is to "
                        "the /healthz rate of its own round)")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--only", nargs="*", choices=[k for k in PATHS if k != "healthz"], default=None,
                        help="these loads only (with /healthz always)")
    parser.add_argument("--profile", type=Path, default=None, help="folder for a py-spy flame graph of each load")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)")
        return 1
    load_before = os.getloadavg()[0]
    base = Path(tempfile.mkdtemp(prefix="cardq-bench-http-"))
    cfg = deployment(base)
    proc, url, http_pid = start(cfg, base / "supervise.out")
    loads = ["healthz", *(args.only or [k for k in PATHS if k != "healthz"])]
    results: dict[str, list[dict]] = {name: [] for name in loads}
    try:
        with cardq.connect(cfg, name="bench") as q:
            token = q.create_token("admin", "bench").token
        run = os.urandom(3).hex()
        for name, body in SCRIPTS.items():
            values = {"token": token, "run": run, "per": EVENTS_PER_REQUEST, "ts_ms": int(time.time() * 1000)}
            (base / f"{name}.lua").write_text(body % values + DONE)
        for n in range(args.rounds):
            if n:
                wait_drained(cfg)  # the workers' CPU is not the next round's
            for name in loads:
                script = base / f"{name}.lua"
                if args.warmup > 0:
                    wrk(url, name, script, duration=args.warmup, connections=args.connections)
                spy = None
                if args.profile is not None and n == 0:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = profile(http_pid, args.duration, args.profile / f"{name}.svg")
                cpu0, t0 = cpu_seconds(http_pid), time.monotonic()
                r = wrk(url, name, script, duration=args.duration, connections=args.connections)
                used = cpu_seconds(http_pid) - cpu0
                r["http_cpu"], r["http_us"] = used / (time.monotonic() - t0) * 100, used / r["requests"] * 1e6
                results[name].append(r)
                if spy is not None:
                    spy.wait(args.duration + 30)
        time.sleep(1.0 + load_config(cfg).config.http.keepalive_s)  # wrk's connections closed by the server
        cpu0, t0 = cpu_seconds(http_pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle = (cpu_seconds(http_pid) - cpu0) / (time.monotonic() - t0) * 100
        with cardq.connect(cfg, name="bench") as q:
            queued = q.pending()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    print(f"cardq HTTP API under wrk ({args.connections} keep-alive connections, 1 wrk thread, loopback, "
          f"{args.duration:g} s each after {args.warmup:g} s of warm-up, {args.rounds} rounds), `cardq supervise` on "
          f"the config `cardq init` writes ([http] listen on port 0; no limit raised); {os.cpu_count()} cores "
          f"shared by wrk, the server, the actors and {load_config(cfg).config.workers.count} workers\n")
    print("| load | requests/s | items/s | p50 | p99 | vs /healthz, same round | target "
          "| HTTP child: CPU, per request |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    health = [r["rate"] for r in results["healthz"]]

    def span(values: list[float], fmt: str) -> str:
        lo, hi = format(min(values), fmt), format(max(values), fmt)
        return lo if lo == hi else f"{lo}–{hi}"

    def row(name: str, label: str, items: int, target: str = "", ok: Any = None) -> None:
        rs = results[name]
        ratios = [r["rate"] / h for r, h in zip(rs, health, strict=True)]
        verdict = ""
        if ok is not None:
            met = sum(1 for r, ratio in zip(rs, ratios, strict=True) if ok(r, ratio) and not r["errors"])
            verdict = f": {'met' if met == len(rs) else 'NOT MET'}" + (f" ({met} of {len(rs)} rounds)"
                                                                         if 0 < met < len(rs) else "")
        print(f"| {label} | {span([r['rate'] for r in rs], ',.0f')} | {span([r['rate'] * items for r in rs], ',.0f')} "
              f"| {span([r['p50_us'] / 1000 for r in rs], '.2f')} ms "
              f"| {span([r['p99_us'] / 1000 for r in rs], '.2f')} ms | {span(ratios, '.2f')}x | {target}{verdict} "
              f"| {span([r['http_cpu'] for r in rs], '.0f')} %, {span([r['http_us'] for r in rs], '.0f')} µs |")

    row("healthz", "GET /healthz (the floor)", 1)
    if "ratelimit" in results:
        row("ratelimit", "POST /v1/ratelimit/check, a new key each", 1, ">= 0.5x /healthz, p99 <= 10 ms",
            lambda r, ratio: ratio >= 0.5 and r["p99_us"] <= 10_000)
    if "events" in results:
        row("events", f"POST /v1/events, {EVENTS_PER_REQUEST} events each", EVENTS_PER_REQUEST, ">= 50,000 events/s",
            lambda r, ratio: r["rate"] * EVENTS_PER_REQUEST >= 50_000)
    if "jobs" in results:
        row("jobs", "POST /v1/jobs, 1 item, a new user each", 1, ">= 2,000 jobs/s", lambda r, ratio: r["rate"] >= 2_000)
    print(f"\nload average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other processes than "
          "these take CPU from them (compare the ratios)")
    print(f"HTTP child CPU with nothing to do ({args.idle_seconds:g} s after the loads): {idle:.2f} % of one core; "
          f"jobs still queued or running at the end: {queued:,}")
    refused = False
    for name, rs in results.items():
        for n, r in enumerate(rs, 1):
            if r["errors"]:
                refused = True
                print(f"{name}, round {n}: {r['errors']} errors (non-2xx {r['status']}, connect {r['connect']}, "
                      f"read {r['read']}, write {r['write']}, timeout {r['timeout']})")
    if refused:
        print("a default limit or a failure refused part of the load: see", base / "supervise.out")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if args.profile is not None:
        print(f"flame graphs (first round): {args.profile}/<load>.svg" if PYSPY else "py-spy not found: no profiles")
    return 0


def wait_drained(cfg: Path, timeout: float = 120.0) -> None:
    """Until the workers have done the jobs the last round submitted (or `timeout`)."""
    deadline = time.monotonic() + timeout
    with cardq.connect(cfg, name="bench") as q:
        while q.pending() and time.monotonic() < deadline:
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
