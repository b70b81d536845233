"""Child processes of the supervisor: what to run (ChildSpec), how it starts, and its channels.

Every child is started with the "spawn" method, so no SQLite connection, lock or thread crosses a fork. Each
child gets its own two pipes to the supervisor — a duplex control pipe (events up, commands down) and a one-way
log pipe — and shares no multiprocessing.Queue with anyone: a child killed at any instant can only break its own
pipes, never wedge another process's channel (a SIGKILLed holder of a shared Queue's lock blocks every other
producer forever; see FIELD_NOTES). A message sent on a pipe is in the kernel when send returns (no feeder
thread), so nothing depends on data a dead process never flushed.

What changes on every job — the job in hand, since when, how many are done — is not sent at all: the child
writes it into its own small shared-memory Slot (no lock: one writer, and a reader that re-reads until it sees a
consistent pair), which the supervisor reads when it needs it. A worker doing 20,000 jobs a second thus costs
the supervisor nothing per job.

A child dies with its supervisor: PR_SET_PDEATHSIG, armed at start and re-checked against getppid().

Every process of the tree has a title that `ps`, `top` and /proc/PID/cmdline show: "cardq: supervisor",
"cardq: ratelimit-0", "cardq: worker-1 idle", "cardq: worker-1 job 123" (set_title, Title).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import multiprocessing as mp
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson
import setproctitle

from cardq import logs
from cardq.config import LoadedConfig

PR_SET_PDEATHSIG = 1
START_METHOD = "spawn"

# Exit codes a child uses to tell the supervisor why it stopped.
EXIT_STOPPED = 0  # asked to stop, or stopped itself cleanly
EXIT_CONFIG = 78  # cannot run with this config (e.g. the handler does not import): restarting will not help
EXIT_STORE = 75  # the database failed under it; its jobs are released and it is restarted
EXIT_CRASHED = 70  # an unexpected exception (a bug), logged as child.crashed; restarted


@dataclass(frozen=True)
class ChildSpec:
    """What the supervisor runs. Every child is permanent: restarted whenever it exits unasked."""

    name: str  # unique in the tree: "worker-1", "counter-0"
    role: str  # "worker" or "actor"
    target: str  # "module:function" called in the child with a ChildContext
    args: dict[str, Any] = field(default_factory=dict)


class Channel:
    """orjson frames over one end of a multiprocessing Pipe. Never pickles: bytes in, bytes out."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, msg: dict[str, Any]) -> bool:
        """False if the other end is gone."""
        try:
            self.conn.send_bytes(orjson.dumps(msg))
            return True
        except (OSError, ValueError):
            return False

    def send_if_room(self, msg: dict[str, Any]) -> bool:
        """Send only if the pipe takes it now (a wake-up to a child that is not reading: one already waits)."""
        try:
            _, writable, _ = select.select([], [self.conn.fileno()], [], 0)
        except (OSError, ValueError):
            return False
        return bool(writable) and self.send(msg)

    def recv(self) -> dict[str, Any] | None:
        """One message, or None when the other end closed (or sent garbage)."""
        try:
            data = self.conn.recv_bytes()
        except (EOFError, OSError):
            return None
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return msg if isinstance(msg, dict) else None

    def poll(self, timeout: float) -> bool:
        try:
            return self.conn.poll(timeout)
        except (EOFError, OSError):
            return True  # readable: recv will report the closed end

    def close(self) -> None:
        self.conn.close()


class Slot:
    """A child's status in shared memory: [job in hand (0: none), its start (time.monotonic(): CLOCK_MONOTONIC,
    one clock for every process), jobs done, state, and for an actor: connections refused for want of
    descriptors, idle connections closed to make room].
    Written only by the child; a SIGKILL at any instant leaves at worst a stale value, never a held lock."""

    JOB, STARTED, DONE, STATE, REFUSED, EVICTED = range(6)
    SIZE = 6
    STATES = ("starting", "idle", "busy", "blocked")  # blocked: waiting for the database to take writes

    def __init__(self, array: Any):
        self.a = array

    def begin(self, job_id: int, now: float) -> None:
        self.a[self.STARTED] = now  # time before id: a reader that sees the new id sees its start time
        self.a[self.JOB] = job_id
        self.a[self.STATE] = 2

    def end(self) -> None:
        self.a[self.JOB] = 0

    def add_done(self, n: int) -> None:
        self.a[self.DONE] += n

    def idle(self) -> None:
        self.a[self.JOB] = 0
        self.a[self.STATE] = 1

    def busy(self) -> None:
        """Jobs in hand (claimed, maybe waiting for a gate's permit): not idle, so not to be woken."""
        self.a[self.STATE] = 2

    def blocked(self, on: bool) -> None:
        """Waiting for the database to take writes (on), or back to work with jobs in hand (off)."""
        if on:
            self.a[self.STATE] = 3
        else:
            self.busy()

    def connections(self, refused: int, evicted: int) -> None:
        self.a[self.REFUSED], self.a[self.EVICTED] = refused, evicted

    def read_connections(self) -> tuple[int, int]:
        return int(self.a[self.REFUSED]), int(self.a[self.EVICTED])

    def read(self) -> tuple[int | None, float | None, int, str]:
        """(job in hand, its start, jobs done, state), consistent with each other."""
        while True:
            job = self.a[self.JOB]
            started = self.a[self.STARTED]
            if self.a[self.JOB] == job:
                break
        return (int(job) or None, started if job else None, int(self.a[self.DONE]),
                self.STATES[int(self.a[self.STATE])])


TITLE_PREFIX = "cardq: "


def set_title(what: str) -> str:
    """Title this process "cardq: <what>"; returns the title it had (for restore_title)."""
    previous = setproctitle.getproctitle()
    setproctitle.setproctitle(TITLE_PREFIX + what)
    return previous


def restore_title(previous: str) -> None:
    setproctitle.setproctitle(previous)


class Title:
    """A worker's title, following what it does: "cardq: worker-1 idle", "cardq: worker-1 job 123".

    Set at every job's start: one call, string built, costs 0.39-0.43 µs on the 2-core VM (300,000 calls, three
    runs, next to a test suite), ~1.5 % of a no-op job at the default config's drain (~30,000 jobs/s a worker;
    an A/B of the whole drain was lost in that machine's noise). Worth it for a title that is always the job in
    hand: one updated at most every 100 ms would show the previous job for as long as a hung one runs, had it
    started within those 100 ms."""

    def __init__(self, name: str):
        self.base = f"{TITLE_PREFIX}{name} "

    def job(self, job_id: int) -> None:
        setproctitle.setproctitle(f"{self.base}job {job_id}")

    def state(self, state: str) -> None:
        setproctitle.setproctitle(self.base + state)


@dataclass
class ChildContext:
    """What a child's target receives."""

    spec: ChildSpec
    loaded: LoadedConfig
    channel: Channel
    slot: Slot
    stop_requested: list[bool]  # set by SIGTERM or a "stop" command; a list so the signal handler can set it

    @property
    def stopping(self) -> bool:
        return self.stop_requested[0]


def start(spec: ChildSpec, loaded: LoadedConfig) -> tuple[mp.process.BaseProcess, Channel, Connection, Slot]:
    """Spawn a child; returns (process, control channel, log pipe read end, status slot) for the supervisor."""
    ctx = mp.get_context(START_METHOD)
    ours, theirs = ctx.Pipe(duplex=True)
    log_read, log_write = ctx.Pipe(duplex=False)
    array = ctx.RawArray("d", Slot.SIZE)
    proc = ctx.Process(target=_entry, args=(spec, loaded, theirs, log_write, array, os.getpid()), name=spec.name)
    proc.start()
    theirs.close()  # the child has its copies; the supervisor keeps only its ends
    log_write.close()
    return proc, Channel(ours), log_read, Slot(array)


def arm_parent_death_signal(parent_pid: int) -> None:
    """Die with the parent: the kernel sends SIGKILL when it exits. Re-check after arming, in case the parent
    died before the call (then the signal will never come)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(EXIT_STOPPED)


def _entry(spec: ChildSpec, loaded: LoadedConfig, conn: Connection, log_conn: Connection, array: Any,
           parent_pid: int) -> None:
    arm_parent_death_signal(parent_pid)
    set_title(spec.name)  # a worker adds what it does (Title); an actor keeps its name
    stop = [False]

    def on_term(_signum: int, _frame: object) -> None:
        stop[0] = True  # only a flag: the child's loop acts on it between jobs

    signal.signal(signal.SIGTERM, on_term)
    # A terminal's ^C reaches the whole process group; the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # config reaches children from the supervisor, validated
    sink = logs.LineSink(log_conn.send_bytes, name=f"{spec.name}-log")
    cfg = loaded.config.log
    logs.configure(spec.role, level=cfg.level, fmt=cfg.format, sink=sink)  # "auto": the terminal we share
    module, _, func = spec.target.partition(":")
    try:
        target = getattr(importlib.import_module(module), func)
        code = target(ChildContext(spec, loaded, Channel(conn), Slot(array), stop))
    except Exception as e:  # a bug: one log line saying where, not a traceback on the supervisor's stderr
        logs.get().error("child.crashed", child=spec.name, error=f"{type(e).__name__}: {e}"[:500], at=raised_at(e))
        code = EXIT_CRASHED
    sink.close()
    sys.exit(code or 0)


def raised_at(e: BaseException) -> str:
    """file:line of the innermost frame of an exception's traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def describe_exit(code: int | None, kill_reason: str | None) -> str:
    """A child's exit, for the log and `cardq status`."""
    if kill_reason == "timeout":
        return "killed: job timeout"
    if kill_reason == "shutdown":
        return "killed: shutdown timeout"
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {0: "stopped", EXIT_CONFIG: "config error", EXIT_STORE: "database error",
            EXIT_CRASHED: "crashed (see child.crashed in the log)"}.get(code, f"exit code {code}")
