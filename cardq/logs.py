"""Logging: structlog, JSON lines (orjson) off a terminal, readable console on one; never blocking the caller.

The old bot's synchronous file logging took the whole service down under an error storm. Here a log call only
renders the line and puts it on a bounded in-memory queue; a background thread does the I/O. When the queue is
full the line is dropped and counted (the count is logged once there is room again), so a stuck disk or a slow
reader can cost log lines, never a stalled job. Children send their lines to the supervisor over their own pipe;
the supervisor's one writer thread puts every process's lines in one place.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog

from cardq.errors import FileError, os_problem

QUEUE_MAX = 10_000
FILE_RETRY_S = 1.0  # a log file that failed a write (disk full) is tried again at most this often


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
    at another path (log.file changed on reload) or at the same one (SIGHUP after logrotate moved it away).

    A file that cannot take a line (its disk is full) hands its lines to standard error — under systemd, the
    journal — with a one-line note saying why, and is tried again once a second; the lines go back to the file,
    with a note, once it takes them again. A full disk costs the log file some lines, never the log."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self.path = path
        self._stream = open_destination(path)
        self._failing_since: float | None = None  # monotonic: when the file refused a line, if it does now
        self._retry_at = 0.0

    def write(self, line: bytes) -> None:
        line = line if line.endswith(b"\n") else line + b"\n"
        with self._lock:
            if self._stream is sys.stderr.buffer:
                self._stream.write(line)
                self._stream.flush()
                return
            now = time.monotonic()
            if self._failing_since is None or now >= self._retry_at:
                try:
                    if self._stream.closed:  # closed when it failed (see _file_failed)
                        self._stream = open_destination(self.path, raw=True)
                    if self._failing_since is not None:
                        # The write that failed may have left half a line: end it, so every line parses.
                        self._stream.write(_unfinished_line_end(self.path)
                                           + _note("log.file_resumed", self.path, since=self._failing_since))
                    self._stream.write(line)
                    self._stream.flush()
                    self._failing_since = None
                    return
                except OSError as e:
                    self._file_failed(e, now)
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()

    def _file_failed(self, e: OSError, now: float) -> None:
        with contextlib.suppress(OSError):
            # What a failed flush left in the buffer would come out, half a line, on the next try: drop it
            # (close() closes the file even when its last flush fails).
            self._stream.close()
        with contextlib.suppress(OSError):
            _drop_unfinished_line(self.path)
        if self._failing_since is None:
            self._failing_since = now
            sys.stderr.buffer.write(_note("log.file_failed", self.path, reason=os_problem(e, self.path),
                                          lines_go_to="standard error until the file takes them again"))
        self._retry_at = now + FILE_RETRY_S

    def reopen(self, path: str | None = None) -> None:
        """Open `path` (default: the same one again) and switch to it; the old stream is closed. Raises
        FileError, leaving the old destination in use, when the new one cannot be opened."""
        path = self.path if path is None else path
        stream = open_destination(path)
        with self._lock:
            old, self._stream, self.path = self._stream, stream, path
            self._failing_since = None
        if old is not sys.stderr.buffer:
            with contextlib.suppress(OSError):
                old.close()


def _drop_unfinished_line(path: str) -> None:
    """Cut the file back to its last complete line (what a write that ran out of space left half done)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        tail = 65536
        f.seek(max(0, size - tail))
        data = f.read()
        if data and not data.endswith(b"\n"):
            end = data.rfind(b"\n")
            if end >= 0 or size <= tail:
                f.truncate(size - len(data) + end + 1)


def _unfinished_line_end(path: str) -> bytes:
    """b"\\n" if the file ends in the middle of a line."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return b""
        f.seek(size - 1)
        return b"" if f.read(1) == b"\n" else b"\n"


def _note(event: str, path: str, *, since: float | None = None, **fields: str) -> bytes:
    """A line of the log's own, about the log file."""
    extra = {"failed_for_s": round(time.monotonic() - since, 1)} if since is not None else {}
    return orjson.dumps({"event": event, "level": "warning" if event.endswith("failed") else "info",
                         "timestamp": datetime.datetime.now(datetime.UTC).isoformat(), "file": path, **fields,
                         **extra}) + b"\n"


def set_level(level: str) -> None:
    """Change this process's log level, keeping everything else of its configuration."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]))


def file_writer(stream: IO[bytes]) -> Callable[[bytes], None]:
    def write(line: bytes) -> None:
        stream.write(line if line.endswith(b"\n") else line + b"\n")
        stream.flush()

    return write


def open_destination(path: str, *, raw: bool = False) -> IO[bytes]:
    """'' → standard error; else the file, appended to (FileError, in one line, when it cannot be opened).
    raw: no exception translation (a retry of a file that was open a moment ago)."""
    if not path:
        return sys.stderr.buffer
    try:
        # 0600: job ids, users and errors are not every local user's to read.
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab")
    except OSError as e:
        if raw:
            raise
        raise FileError(path, "open the log file (log.file)", e) from None


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
