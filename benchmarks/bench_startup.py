"""How long cardq takes to start, beside the interpreter's own start measured in the same run.

    .venv/bin/python benchmarks/bench_startup.py            # 15 runs of each (7 of supervise)

Figures (best and median of the runs, after one warm-up run so that bytecode caches exist, as on an installed
cardq): `import cardq` for an app; an app's first call (`connect` and one read); `cardq --help`; `cardq status`
on a fresh database; `cardq supervise --burst` with nothing to do, on the config `cardq init` writes. The floor
is `python -c pass`. A report (exit 0), not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
CARDQ = str(Path(sys.executable).parent / "cardq")
# Bytecode caches are what an installed cardq runs with; a development shell may turn their writing off.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], runs: int, cwd: Path) -> tuple[float, float]:
    """(best, median) milliseconds of the whole command."""
    subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, check=True)  # warm-up: caches written
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return min(times), statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cardq-bench-startup-"))
    try:
        cfg = base / "config.toml"
        subprocess.run([CARDQ, "init", "--config", str(cfg)], env=ENV, cwd=base, capture_output=True, check=True)
        rows = [
            ("python -c pass (the floor)", [PY, "-c", "pass"], None, args.runs),
            ("import cardq", [PY, "-c", "import cardq"], 50, args.runs),
            ("an app's first call: import, connect, one read",
             [PY, "-c", f"import cardq; cardq.connect({str(cfg)!r}).pending()"], None, args.runs),
            ("cardq --help", [CARDQ, "--help"], 100, args.runs),
            ("cardq status", [CARDQ, "status", "--config", str(cfg)], 100, args.runs),
            ("cardq supervise --burst, nothing to do", [CARDQ, "supervise", "--burst", "--config", str(cfg)], 500,
             max(3, args.runs // 2)),
        ]
        results = [(name, timed(cmd, runs, base), target) for name, cmd, target, runs in rows]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    floor = results[0][1][0]
    print("| command | best | median | over the interpreter's start | target |")
    print("|---|---:|---:|---:|---|")
    for name, (best, median), target in results:
        verdict = "" if target is None else f"<= {target} ms: {'PASS' if median <= target else 'FAIL'}"
        print(f"| {name} | {best:.0f} ms | {median:.0f} ms | +{best - floor:.0f} ms | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
