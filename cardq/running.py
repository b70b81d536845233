"""Running the supervisor from the CLI, and talking to a running one: signals, waiting, status summary."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from cardq.config import LoadedConfig
from cardq.errors import Error
from cardq.lockfile import NotRunning, running_pid
from cardq.store import processes


def supervise(loaded: LoadedConfig, *, workers: int | None, burst: bool,
              on_progress: Callable[[int], None] | None = None) -> None:
    """Run a supervisor in this process until it stops. The log goes where [log] says, through one
    non-blocking writer; `on_progress(n)` hears of every n jobs done. Raises RestartIntensityExceeded when
    children kept dying, ConfigError when a child cannot run with this config."""
    # Here, not at the top: `cardq status` and `stop` import this module too, and need neither the supervisor
    # nor structlog (which loads asyncio: ~90 ms).
    from cardq import logs
    from cardq.supervisor import Supervisor

    cfg = loaded.config.log
    destination = logs.Destination(cfg.file)
    sink = logs.LineSink(destination.write)
    previous = logs.configure("supervisor", level=cfg.level, fmt=cfg.format, sink=sink)
    sup = Supervisor(loaded, workers=workers, burst=burst, log_sink=sink.put, on_progress=on_progress,
                     log_destination=destination)
    try:
        sup.run()
    finally:
        sink.close()
        logs.restore(previous)  # an app that ran a supervisor in-process keeps its own logging afterwards


def with_log_level(loaded: LoadedConfig, level: str) -> LoadedConfig:
    config = msgspec.structs.replace(loaded.config, log=msgspec.structs.replace(loaded.config.log, level=level))
    return LoadedConfig(config, loaded.path, loaded.digest, loaded.explicit)


def signal_supervisor(loaded: LoadedConfig, name: str) -> int:
    """Send a signal to the live supervisor of the configured database; returns its pid."""
    try:
        pid = running_pid(loaded.db_path)
        os.kill(pid, getattr(signal, name))
    except ProcessLookupError:
        raise Error(f"supervisor pid {pid} is gone") from None
    return pid


def reload_and_wait(loaded: LoadedConfig, db: Any, wait_s: float) -> dict[str, Any]:
    """SIGHUP the supervisor, then wait for its published reload count to move: the outcome of this reload."""
    def info() -> dict[str, Any]:
        sup = next((r for r in processes.read_all(db) if r["role"] == "supervisor"), None)
        return sup["info"] if sup else {}

    before = info().get("reloads", 0)
    pid = signal_supervisor(loaded, "SIGHUP")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = info()
        if now.get("reloads", 0) > before:
            error = now.get("last_reload_error")
            return {"pid": pid, "applied": error is None, "config_version": now.get("config_version"),
                    "config_digest": now.get("config_digest"), "error": error}
        time.sleep(0.05)  # the supervisor publishes the outcome at once; this polls a row, not the jobs
    return {"pid": pid, "applied": None, "config_version": None, "config_digest": None, "error": None}


def wait_stopped(loaded: LoadedConfig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running_pid(loaded.db_path)
        except NotRunning:
            return
        time.sleep(0.05)
    raise Error(f"the supervisor did not stop within {timeout:g}s")


HTTP_ADDRESS_FILE = "http.json"  # in run_dir: where the HTTP server listens now (written by cardq/web/server.py)


def http_address(run_dir: Path) -> str | None:
    """The URL the running HTTP server published ("http://127.0.0.1:8787", "unix:/path"), if one runs."""
    import orjson

    try:
        return orjson.loads((run_dir / HTTP_ADDRESS_FILE).read_bytes()).get("url")
    except (OSError, ValueError, AttributeError):
        return None


def supervisor_summary(loaded: LoadedConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Who runs this database now, with which config, and each worker's state (from the published rows,
    trusted only while the supervisor's lock is held)."""
    try:
        pid = running_pid(loaded.db_path)
    except NotRunning:
        pid = None
    sup = next((r for r in rows if r["role"] == "supervisor"), None)
    if pid is None or sup is None or sup["pid"] != pid:
        return {"running": False, "pid": pid, "workers": []}
    info = sup["info"]
    now = time.time()
    return {
        "running": True,
        "pid": pid,
        "uptime_s": round(now - sup["started_at"], 1) if sup["started_at"] else None,
        "heartbeat_age_s": round(now - sup["heartbeat_at"], 1),
        "config_file": info.get("config_file"),
        "config_digest": info.get("config_digest"),
        "config_version": info.get("config_version"),
        "config_loaded_at": info.get("config_loaded_at"),
        "last_reload_error": info.get("last_reload_error"),
        "last_reload_at": info.get("last_reload_at"),  # None: not reloaded since it started
        "reloads": info.get("reloads"),
        "workers_desired": info.get("workers_desired"),
        "wakeups_sent": info.get("wakeups_sent"),
        "http": http_address(loaded.run_dir),
        "workers": [
            {**{k: r[k] for k in ("name", "pid", "state", "current_job", "jobs_done", "restarts", "last_exit")},
             **r["info"]}  # an actor's: connections_refused, connections_evicted
            for r in rows if r["role"] != "supervisor"
        ],
    }
