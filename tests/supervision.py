"""A real cardq deployment in a temp folder, for the multi-process tests: config file, database, and
`cardq supervise` run as a real process (its own session, so teardown can kill everything it started)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

import cardq
from cardq.actors.protocol import socket_path
from cardq.config import load_config
from cardq.store import Database, queries
from cardq.store import processes as store_processes

from conftest import wait_for

CARDQ = str(Path(sys.executable).parent / "cardq")
TESTS_DIR = Path(__file__).resolve().parent

BASE_CONFIG: dict[str, dict[str, Any]] = {
    "store": {"path": "cardq.db"},
    "workers": {"count": 2, "handler": "handlers_for_tests:behave", "job_timeout_s": 30.0, "lease_s": 60.0,
                "max_attempts": 5, "backoff_base_s": 0.0, "backoff_max_s": 0.0},
    "supervisor": {"recover_interval_s": 120.0, "restart_backoff_max_s": 0.2, "shutdown_timeout_s": 20.0,
                   "timeout_grace_s": 0.5, "max_restarts": 100, "max_seconds": 60.0},
    "log": {"file": "cardq.log", "level": "debug", "format": "json"},
    "limits": {"batch_max_items_per_request": 100_000, "batch_max_queued_per_user": 100_000},
    "limits.daily": {"enterprise": 1_000_000},
    "http": {"enabled": False},  # tests/test_http.py turns it on (on port 0); the rest need no extra process
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{orjson.dumps(str(k)).decode()} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return orjson.dumps(value).decode()


def toml(config: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{orjson.dumps(key).decode()} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def pid_gone(pid: int) -> bool:
    """True once pid is not running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


class Deployment:
    def __init__(self, root: Path, *, out_dir: Path | None = None, **overrides: dict[str, Any]):
        self.root = root
        self.out_dir = out_dir or root  # where each supervise's stdout and stderr go
        self.config_path = root / "config.toml"
        self.config: dict[str, dict[str, Any]] = {k: dict(v) for k, v in BASE_CONFIG.items()}
        self.write_config(**overrides)
        self.loaded = load_config(self.config_path)
        self.db = Database.open(self.loaded.db_path, create=True)
        self.procs: list[subprocess.Popen] = []
        self.max_descriptors: int | None = None  # a hard RLIMIT_NOFILE for the supervisor's tree

    # -- config ------------------------------------------------------------------------------------------
    def write_config(self, **overrides: dict[str, Any]) -> None:
        for section, values in overrides.items():
            self.config.setdefault(section, {}).update(values)
        self.config_path.write_text(toml(self.config))

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "CARDQ_CONFIG": str(self.config_path)}

    # -- processes ---------------------------------------------------------------------------------------
    def cardq(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([CARDQ, *args], env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`cardq supervise ARGS` in its own session; `env`: variables added to its environment."""
        out = open(self.out_dir / f"supervise-{len(self.procs)}.out", "wb")  # noqa: SIM115 - closed with the proc
        limit = self.max_descriptors

        def limit_descriptors() -> None:  # in the child, before exec: the whole tree inherits it
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        proc = subprocess.Popen([CARDQ, "supervise", *args], env={**self.env, **(env or {})}, cwd=self.root, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=limit_descriptors)
        self.procs.append(proc)
        return proc

    def wait_for_actor(self, actor: str = "ratelimit", shard: int = 0, timeout: float = 60) -> None:
        """Until the actor listens (its socket file is there)."""
        path = socket_path(self.loaded.run_dir, actor, shard)
        wait_for(path.exists, timeout, what=f"the {actor} actor listening")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with_suppressed(os.killpg, proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.db.close()

    # -- data --------------------------------------------------------------------------------------------
    def submit(self, payloads: list[dict], user: str = "u1", plan: str = "enterprise") -> list[int]:
        """Through the public API, as an app submits."""
        with cardq.connect(self.config_path, name="test") as q:
            return q.submit(payloads, user=user, plan=plan).ids

    def job(self, job_id: int) -> dict[str, Any]:
        return queries.get(self.db, job_id)

    def statuses(self, ids: list[int] | None = None) -> dict[str, int]:
        sql = "SELECT status, count(*) FROM jobs"
        if ids is not None:
            sql += f" WHERE id IN ({','.join(map(str, ids))})"
        return dict(self.db.conn.execute(sql + " GROUP BY status").fetchall())

    def workers(self) -> list[dict[str, Any]]:
        rows = self.db.read(store_processes.read)
        return [r for r in rows if r["role"] == "worker"]

    def supervisor_row(self) -> dict[str, Any] | None:
        return next((r for r in self.db.read(store_processes.read) if r["role"] == "supervisor"), None)

    def worker_holding(self, job_id: int) -> dict[str, Any] | None:
        """The worker whose lease holds the job now, from the jobs table (exact) and the published process row
        of that worker's name (its pid). The processes table alone is a 1 Hz snapshot that can miss a short job."""
        rows = self.db.conn.execute("SELECT lease_owner FROM jobs WHERE id = ? AND status = 'processing'",
                                    (job_id,)).fetchall()
        if not rows:
            return None
        name = rows[0][0].rsplit(":", 1)[1].rsplit(".", 1)[0]  # "cardq:<run>:worker-1.<incarnation>"
        return next((w for w in self.workers() if w["name"] == name and w["pid"]), None)

    def busy_worker_on(self, job_id: int) -> dict[str, Any] | None:
        return next((w for w in self.workers() if w["current_job"] == job_id and w["pid"]), None)

    def log_lines(self) -> list[dict[str, Any]]:
        path = self.root / "cardq.log"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    def output(self, n: int = 0) -> str:
        return (self.out_dir / f"supervise-{n}.out").read_text(errors="replace")


def with_suppressed(fn, *args) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        fn(*args)
