"""Logging: structlog, JSON lines (orjson) off a terminal, readable console on one; never blocking the caller.

The old bot's synchronous file logging took the whole service down under an error storm. Here a log call only
renders the line and puts it on a bounded in-memory queue; a background thread does the I/O. When the queue is
full the line is dropped and counted (the count is logged once there is room again), so a stuck disk or a slow
reader can cost log lines, never a stalled job. Children send their lines to the supervisor over their own pipe;
the supervisor's one writer thread puts every process's lines in one place.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog

QUEUE_MAX = 10_000


class LineSink:
    """A bounded queue of finished lines, drained by one daemon thread calling `write(line)`."""

    def __init__(self, write: Callable[[bytes], None], name: str = "log-writer"):
        self._write = write
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_MAX)
        self._lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        """Never blocks: a full queue drops the line and counts it."""
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            with self._lock:
                dropped, self.dropped = self.dropped, 0
            try:
                if dropped:
                    self._write(orjson.dumps({"event": "log.dropped", "lines": dropped, "level": "warning"}))
                self._write(line)
            except (OSError, ValueError, EOFError):
                # The destination is gone (a closed pipe, a full disk): lose lines, not the process, and keep
                # counting them (the earlier count goes back too: its note was not written either).
                with self._lock:
                    self.dropped += dropped + 1

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (up to `timeout`) and stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


class Destination:
    """Where the supervisor's writer thread puts every line: standard error, or a file that can be reopened —
    at another path (log.file changed on reload) or at the same one (SIGHUP after logrotate moved it away)."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self.path = path
        self._stream = open_destination(path)

    def write(self, line: bytes) -> None:
        with self._lock:
            self._stream.write(line if line.endswith(b"\n") else line + b"\n")
            self._stream.flush()

    def reopen(self, path: str | None = None) -> None:
        """Open `path` (default: the same one again) and switch to it; the old stream is closed. Raises
        OSError, leaving the old destination in use, when the new one cannot be opened."""
        path = self.path if path is None else path
        stream = open_destination(path)
        with self._lock:
            old, self._stream, self.path = self._stream, stream, path
        if old is not sys.stderr.buffer:
            old.close()


def set_level(level: str) -> None:
    """Change this process's log level, keeping everything else of its configuration."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]))


def file_writer(stream: IO[bytes]) -> Callable[[bytes], None]:
    def write(line: bytes) -> None:
        stream.write(line if line.endswith(b"\n") else line + b"\n")
        stream.flush()

    return write


def open_destination(path: str) -> IO[bytes]:
    """'' → standard error; else the file, appended to."""
    if not path:
        return sys.stderr.buffer
    # 0600: job ids, users and errors are not every local user's to read.
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab")


class _SinkLogger:
    """The object structlog hands the rendered line to; every level method just queues it."""

    def __init__(self, sink: LineSink):
        self._sink = sink

    def msg(self, message: str | bytes) -> None:
        self._sink.put(message.encode() if isinstance(message, str) else message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure(role: str, *, level: str, fmt: str, sink: LineSink, tty: bool | None = None) -> dict[str, Any]:
    """Set up structlog for this process: each line carries role and pid (and job id, when bound). Returns the
    configuration it replaced (see `restore`)."""
    previous = structlog.get_config()
    if tty is None:
        tty = sys.stderr.isatty()
    use_console = fmt == "console" or (fmt == "auto" and tty)
    pid = os.getpid()

    def add_process(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("role", role)
        event.setdefault("pid", pid)
        return event

    renderer: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_process,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _SinkLogger(sink),
        cache_logger_on_first_use=False,
    )
    return previous


def restore(previous: dict[str, Any]) -> None:
    """Put back a structlog configuration that `configure` replaced."""
    structlog.configure(**previous)


def get(**bind: Any) -> Any:
    """A logger that follows the configuration in effect at each call (a lazy proxy: `.bind()` on one would fix
    the level it was made with, and a level changed on reload would not reach it)."""
    return structlog.get_logger(**bind)
