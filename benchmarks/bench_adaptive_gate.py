"""Fixed gates against an adaptive one, on an upstream of limited capacity.

    .venv/bin/python benchmarks/bench_adaptive_gate.py              # 300 jobs, capacity 6, 300 ms a call
    .venv/bin/python benchmarks/bench_adaptive_gate.py --jobs 300 --capacity 6 --service-ms 300 --workers 16

The upstream is tests/fake_upstream.py, a real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions
API: it serves `capacity` requests at once in `service-ms` each and answers 503 (no Retry-After) to any request
past that, as an overloaded AI API does. cardq runs the card generator (`cardq.cards:generate`) on the config
`cardq init` writes, changed only where the comparison needs it: the handler, [upstream], `--workers 16` (enough
workers to exceed any gate), and the gate — fixed at 4, fixed at 16, adaptive between 1 and 16. Retries, backoff
(2 s doubling) and max_attempts (5) are the defaults. Each run is the whole `cardq supervise --burst` command,
which exits once every job is done or dead.

The ideal is known: jobs x service time / capacity. For each gate: the time against that ideal, the 503s the
upstream sent, and the jobs that went dead.

First, what a gate costs per call (a free permit, one thread: the fast path a worker takes around each job),
fixed and adaptive, beside the floor of the same run: one bare flock() take and give on one file.
A report (exit 0), not a test.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_upstream import FakeUpstream  # noqa: E402 - the tests' stand-in for the paid API

from cardq import logs  # noqa: E402
from cardq.actors.client import ActorClient  # noqa: E402
from cardq.actors.gatelimit import AdaptiveLimit  # noqa: E402
from cardq.actors.keys import ensure_run_dir  # noqa: E402
from cardq.config import load_config  # noqa: E402

CARDQ = str(Path(sys.executable).parent / "cardq")

GATES = {
    "fixed 4 (the default)": {"max_concurrency": 4},
    "fixed 16": {"max_concurrency": 16},
    "adaptive 1-16": {"max_concurrency": 16, "adaptive": True, "min_concurrency": 1},
}


def configure(cfg: Path, base_url: str, gate: dict) -> None:
    text = cfg.read_text()
    edits = {
        'handler = "cardq.cards:make_card"': 'handler = "cardq.cards:generate"',
        'base_url = ""': f'base_url = "{base_url}"',
        'model = ""': 'model = "fake-model"',
        "max_concurrency = 4": f"max_concurrency = {gate['max_concurrency']}",
        "adaptive = false": f"adaptive = {'true' if gate.get('adaptive') else 'false'}",
        "min_concurrency = 1": f"min_concurrency = {gate.get('min_concurrency', 1)}",
    }
    for old, new in edits.items():
        assert text.count(old) == 1, f"{old!r} is not in the config `cardq init` writes: update this benchmark"
        text = text.replace(old, new)
    cfg.write_text(text)


def gate_cost(root: Path, calls: int) -> None:
    root.mkdir(parents=True)
    logs.set_level("warning")  # the adaptive gate's climb to 16 logs each step
    floor_file = os.open(root / "floor", os.O_RDWR | os.O_CREAT, 0o600)
    started = time.perf_counter()
    for _ in range(calls):
        fcntl.flock(floor_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(floor_file, fcntl.LOCK_UN)
    floor = (time.perf_counter() - started) / calls * 1e6
    os.close(floor_file)
    print(f"gate cost per call, one thread, a free permit ({calls:,} calls); floor: a bare flock take + give "
          f"{floor:.2f} µs")
    for name, gate in [("fixed 4", {"max_concurrency": 4}),
                       ("adaptive 1-16 (at 16)", {"max_concurrency": 16, "adaptive": True}),
                       ("adaptive 1-16 (cut to 6)", {"max_concurrency": 16, "adaptive": True})]:
        cfg = root / f"{len(name)}-{gate['max_concurrency']}.toml"
        cfg.write_text(f'[actors]\nrun_dir = "{root / "run"}"\n[gates.generation]\n'
                       + "".join(f"{k} = {str(v).lower()}\n" for k, v in gate.items()))
        loaded = load_config(cfg)
        ensure_run_dir(loaded.run_dir)
        with ActorClient.from_config(loaded) as client:
            if "cut" in name:  # calls failing as overloads would cut it: record drops until it is at 6
                adaptive = AdaptiveLimit.of_gate(loaded.run_dir, "generation")
                while adaptive.current(1, 16) > 6:
                    adaptive.record(1, 16, time.monotonic(), "drop", 0.0)
                adaptive.close()
            for _ in range(1000):
                with client.gate("generation"):
                    pass
            started = time.perf_counter()
            for _ in range(calls):
                with client.gate("generation"):
                    pass
            per = (time.perf_counter() - started) / calls * 1e6
        print(f"  {name:<26} {per:6.2f} µs  ({per / floor:.1f}x the floor)")


def run(root: Path, gate: dict, args: argparse.Namespace) -> dict:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    upstream = FakeUpstream(capacity=args.capacity, service_s=args.service_ms / 1000)
    try:
        cfg = root / "config.toml"
        subprocess.run([CARDQ, "init", "--config", str(cfg)], cwd=root, check=True, capture_output=True)
        configure(cfg, upstream.base_url, gate)
        items = root / "items.jsonl"
        items.write_text("".join(orjson.dumps({"title": f"Item {i}", "marketplace": "ozon"}).decode() + "\n"
                                 for i in range(args.jobs)))
        # The default plan limits (200 items a request, 300 queued) are the product's; raised in the database,
        # as an operator would, without touching config.toml.
        for key in ("batch_max_queued_per_user", "batch_max_items_per_request"):
            subprocess.run([CARDQ, "limits", "set", key, str(args.jobs * 2), "--config", str(cfg)], cwd=root,
                           check=True, capture_output=True)
        subprocess.run([CARDQ, "submit", str(items), "--user", "bench", "--plan", "enterprise", "--quiet",
                        "--config", str(cfg)], cwd=root, check=True, capture_output=True)
        started = time.perf_counter()
        out = subprocess.run([CARDQ, "supervise", "--workers", str(args.workers), "--burst", "--config", str(cfg)],
                             cwd=root, check=True, capture_output=True, timeout=1800)
        elapsed = time.perf_counter() - started
        counts = orjson.loads(subprocess.run([CARDQ, "status", "--json", "--config", str(cfg)], cwd=root,
                                             check=True, capture_output=True).stdout)["jobs"]
        changes = (out.stdout + out.stderr).count(b"gate.limit_changed")  # the default log: stderr
        return {"s": elapsed, "done": counts.get("done", 0), "dead": counts.get("dead", 0),
                "rejected": upstream.rejected, "served": upstream.served, "most": upstream.most_in_flight,
                "changes": changes}
    finally:
        upstream.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--capacity", type=int, default=6)
    ap.add_argument("--service-ms", type=float, default=300.0)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--calls", type=int, default=100_000, help="gate calls for the per-call cost")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    try:
        gate_cost(base / "cost", args.calls)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ideal = args.jobs * args.service_ms / 1000 / args.capacity
    print(f"{args.jobs} card jobs, {args.workers} workers; upstream: {args.capacity} at once, "
          f"{args.service_ms:g} ms each, 503 past that. Ideal: {ideal:.1f} s")
    print(f"{'gate':<24} {'time':>8} {'x ideal':>8} {'503s':>6} {'done':>5} {'dead':>5} {'upstream peak':>14} "
          f"{'limit changes':>14}")
    base = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    try:
        for name, gate in GATES.items():
            r = run(base / "run", gate, args)
            print(f"{name:<24} {r['s']:>7.1f}s {r['s'] / ideal:>7.2f}x {r['rejected']:>6} {r['done']:>5} "
                  f"{r['dead']:>5} {r['most']:>14} {r['changes']:>14}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
