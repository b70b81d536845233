"""The handler contract: `workers.handler = "module:function"` names a function `fn(job: Job) -> result`.

The result must be JSON-serialisable; it is stored as the job's result. Raise `PermanentError` for a failure no
retry can fix (bad input): the job goes straight to dead. Any other exception is a transient failure, retried
with backoff until max_attempts.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardq.config import Config
from cardq.errors import ConfigError


class PermanentError(Exception):
    """The job cannot succeed however often it is retried (e.g. a missing field)."""


class RetryAfter(Exception):
    """Retry this job, but not before `seconds` from now (an upstream answered 429 or 503 with Retry-After). The
    attempt counts like any failure; the wait is the longer of `seconds` (honoured up to 15 minutes) and the usual
    backoff."""

    overload = True  # under an adaptive gate (actors/gatelimit.py): the upstream pushed back, cut the limit

    def __init__(self, seconds: float, message: str):
        super().__init__(message)
        self.seconds = max(0.0, float(seconds))


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    user_id: str
    plan: str
    kind: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    config: Config
    config_dir: Path | None = None  # the folder of config.toml (relative paths in it are relative to this)


Handler = Callable[[Job], Any]


def load_handler(spec: str) -> Handler:
    """Import "module:function"; ConfigError naming the spec if it cannot be imported or is not callable."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is a config problem to report in one line
        raise ConfigError(f'workers.handler = "{spec}": cannot import {module_name}: {type(e).__name__}: {e}') \
            from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f'workers.handler = "{spec}": {module_name} has no function {func_name}')
    return fn


CHECK_TIMEOUT_S = 10.0


class HandlerCheck:
    """Import "module:function" in a throwaway process and check it is callable. Importing runs the module's
    code — it may sleep, loop, or call sys.exit() — so the supervisor never imports a handler itself: it starts
    a check and polls it from its loop, which keeps running meanwhile."""

    def __init__(self, spec: str, timeout_s: float = CHECK_TIMEOUT_S):
        self.spec, self.deadline = spec, time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._reader, writer = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_check_child, args=(spec, writer), name="handler-check", daemon=True)
        self._proc.start()
        writer.close()

    def poll(self) -> str | None:
        """None while it runs; then "" when the handler imports and is callable, else the one-line reason."""
        try:
            if self._reader.poll(0):
                return self._finish(self._reader.recv_bytes().decode())
        except EOFError:  # the child died without a word: os._exit() at import, or a crash
            self._proc.join(1)
            return self._finish(f'workers.handler = "{self.spec}": importing it ended the process (exit code '
                                f"{self._proc.exitcode})")
        if time.monotonic() >= self.deadline:
            return self._finish(f'workers.handler = "{self.spec}": importing it did not finish within '
                                f"{self.timeout_s:g}s")
        return None

    def poll_and_stop(self) -> None:
        """Abandon the check (a newer reload replaces it)."""
        if not self._reader.closed:
            self._finish("")

    def wait(self) -> None:
        """Block until the check ends; ConfigError with its reason if it failed (for callers with no loop)."""
        while (outcome := self.poll()) is None:
            self._reader.poll(max(0.0, min(0.1, self.deadline - time.monotonic())))
        if outcome:
            raise ConfigError(outcome)

    def _finish(self, outcome: str) -> str:
        self._reader.close()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5)
        return outcome


def _check_child(spec: str, conn) -> None:
    try:
        load_handler(spec)
        conn.send_bytes(b"")
    except ConfigError as e:
        conn.send_bytes(str(e).encode())
    except BaseException as e:  # noqa: BLE001 - SystemExit and the like: reported as the handler's fault
        conn.send_bytes(f'workers.handler = "{spec}": importing it raised {type(e).__name__}: {e}'.encode())


def noop(job: Job) -> None:
    """A handler that does nothing: for benchmarks and smoke tests of the machinery itself."""
    return None
