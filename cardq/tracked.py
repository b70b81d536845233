"""A child as the supervisor tracks it across its incarnations: what runs now (process, pipes, status slot),
what the last one left (exit reason), and the figures `cardq status` shows. Reading its pipes and slot is here;
deciding what to do about them is the supervisor's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from cardq.children import Channel, ChildSpec, Slot


@dataclass
class TrackedChild:
    spec: ChildSpec
    proc: BaseProcess | None = None
    channel: Channel | None = None
    log_conn: Connection | None = None
    slot: Slot | None = None
    state: str = "starting"  # starting, idle, busy, blocked, stopping, restarting, stopped
    owner: str = ""  # the lease owner of its jobs, new with each incarnation
    incarnation: int = 0
    current_job: int | None = None  # for an actor: the fingerprint of the message in hand
    job_started: float | None = None  # time.monotonic() when it started (the same clock in every process)
    jobs_done: int = 0
    restarts: int = 0
    last_exit: str | None = None
    started_at: float | None = None  # wall clock
    kill_reason: str | None = None  # "timeout" or "shutdown" when the supervisor killed it
    jobs_done_base: int = 0  # jobs done by earlier incarnations (the slot counts this one's)
    retiring: bool = False  # scaled away or shutting down: not restarted
    connections_refused: int = 0  # an actor's, this incarnation: refused for want of descriptors
    connections_evicted: int = 0  # an actor's, this incarnation: idle ones closed to make room

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.exitcode is None

    @property
    def name(self) -> str:
        return self.spec.name

    def waitables(self) -> list:
        out: list = [c for c in (self.channel.conn if self.channel else None, self.log_conn) if c]
        if self.alive:
            out.append(self.proc.sentinel)
        return out

    def drain_events(self) -> None:
        """Act on what the child said: {"ev": "idle"} is the only event."""
        while self.channel is not None and self.channel.poll(0):
            msg = self.channel.recv()
            if msg is None:
                break
            if msg.get("ev") == "idle" and self.state != "stopping":
                self.state = "idle"

    def drain_logs(self, sink: Callable[[bytes], None]) -> None:
        """Hand every log line the child sent to the one writer."""
        while self.log_conn is not None:
            try:
                if not self.log_conn.poll(0):
                    return
                sink(self.log_conn.recv_bytes())
            except (EOFError, OSError):
                self.log_conn.close()
                self.log_conn = None

    def read_slot(self) -> int:
        """Update from the shared-memory slot; returns how many jobs it finished since the last read."""
        if self.slot is None:
            return 0
        job, started, done, state = self.slot.read()
        if self.spec.role == "actor":
            self.connections_refused, self.connections_evicted = self.slot.read_connections()
        self.current_job, self.job_started = job, started
        if self.state not in ("stopping", "stopped", "restarting"):
            self.state = "busy" if job else state
        delta = self.jobs_done_base + done - self.jobs_done
        if delta <= 0:
            return 0
        self.jobs_done += delta
        return delta

    def forget_process(self) -> None:
        """The process has exited and been accounted for: close its pipes."""
        for conn in (self.channel.conn if self.channel else None, self.log_conn):
            if conn is not None:
                conn.close()
        self.proc, self.slot, self.channel, self.log_conn = None, None, None, None
