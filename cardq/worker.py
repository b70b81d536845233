"""A worker process: claim jobs, run the handler, store the result or the error, report to the supervisor.

The job in hand, its start and the count of jobs done go into the worker's shared-memory Slot (see
cardq/children.py); the only event sent up the control pipe is {"ev": "idle"}, when a claim found nothing.
Commands received: {"cmd": "wake"} (new jobs may be runnable),
{"cmd": "stop"} (finish the job in hand, give back the rest, exit), {"cmd": "config", "text": ..., "digest": ...}
(a reloaded, already validated config.toml).

Leases are renewed by the supervisor for every live worker, and a dead worker's jobs are released by the
supervisor by owner name — so this loop stays single-threaded and a crash at any instant loses nothing.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import structlog

from cardq import app, doorbell, jsonshape, logs
from cardq.actors.client import ActorClient
from cardq.children import EXIT_CONFIG, EXIT_STOPPED, EXIT_STORE, ChildContext, Title
from cardq.config import LoadedConfig, parse_config
from cardq.errors import ActorError, ConfigError, Error
from cardq.handlers import Handler, Job, PermanentError, RetryAfter, load_handler
from cardq.store import LeaseLost, StoreBusy, StoreError, StoreUnwritable, jobs

T = TypeVar("T")

IDLE_POLL_S = 10.0  # an idle worker looks for work at least this often, even if no wake-up comes (the doorbell
# wakes it for every submit; this finds rows written by other means)
GATE_UNAVAILABLE_PAUSE_S = 1.0  # a worker whose gate cannot be reached waits this long before its next claim
FLUSH_S = 0.02  # with prefetch > 1, finished jobs are committed together at least this often
# A handler's RetryAfter (an upstream's Retry-After) is honoured up to this long. A job scheduled further ahead than
# this and the longest backoff is taken for one a wall clock stepped back left there, and runs at once.
RETRY_AFTER_MAX_S = 900.0
# prefetch = "auto": claim about PREFETCH_WINDOW_S of work at the pace measured (a job's time, smoothed), 1 to
# PREFETCH_AUTO_MAX jobs. Short enough that a batch never keeps jobs from idle workers for long; long enough that
# many tiny jobs share one transaction. A job far slower than its batch was sized for gives the rest back at once.
PREFETCH_WINDOW_S = 0.005
PREFETCH_AUTO_MAX = 256
COMMAND_POLL_S = 0.001  # within a batch, the supervisor's commands (a stop) are looked for at least this often
STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.2, 5.0  # waits between writes tried on a full (or read-only) disk


class JobTimeout(BaseException):
    """Raised in the handler by SIGALRM at workers.job_timeout_s. A BaseException so that a handler's
    `except Exception` cannot swallow it. (The one signal handler here that does more than set a flag: raising
    is the only way to interrupt Python code that is running.)"""

    overload = True  # under an adaptive gate: a call that ran this long is the upstream slowing down


def _on_alarm(_signum: int, _frame: object) -> None:
    raise JobTimeout


class Worker:
    def __init__(self, ctx: ChildContext):
        self.ctx = ctx
        self.loaded: LoadedConfig = ctx.loaded
        self.owner: str = ctx.spec.args["owner"]
        self.db = app.open_db(self.loaded, autocheckpoint=False)  # the supervisor checkpoints, off our hot path
        self.handler: Handler = load_handler(self.loaded.config.workers.handler)
        self.rng = random.Random()
        self.log = logs.get()
        self.title = Title(ctx.spec.name)  # "cardq: worker-1 job 123" in ps
        self.client: ActorClient | None = None  # to the actors, made on first use
        self.pending: list[tuple[int, int, Any]] = []  # finished, not yet committed: (id, token, result)
        self.took: dict[int, tuple[str, float]] = {}  # job id -> (kind, seconds its handler ran), for the pending
        # ones (the totals' duration histogram: the handler's own time, not the batch's wait for its commit)
        self.pending_since = 0.0
        self.pace: float | None = None  # seconds a job takes here, smoothed; None until one has run since idle

    @property
    def backoff(self) -> jobs.Backoff:
        w = self.loaded.config.workers
        return jobs.Backoff(w.backoff_base_s, w.backoff_max_s)

    def run(self) -> int:
        signal.signal(signal.SIGALRM, _on_alarm)
        self.log.info("worker.started", owner=self.owner)
        while not self.ctx.stopping:
            self.handle_commands(0)
            if self.ctx.stopping:
                break
            held = self.claim_next()
            if not held:
                self.pace = None  # what comes next may be another kind of job: start at one again
                if self.ctx.slot.read()[3] != "idle":  # tell the supervisor once, not at every empty look
                    self.ctx.slot.idle()
                    self.title.state("idle")
                    self.ctx.channel.send({"ev": "idle"})
                self.handle_commands(IDLE_POLL_S)
                continue
            self.ctx.slot.busy()  # before any gate wait: the supervisor must not queue wake-ups to a busy worker
            polled = 0.0
            for n, job in enumerate(held):
                # A stop that came while the claim ran, or during the previous job of a prefetched batch, gives
                # the rest back untouched instead of running it. (Looked for before the first job, then once a
                # millisecond: a poll of the pipe per no-op job was a tenth of a worker's time.)
                started = time.monotonic()
                if started - polled >= COMMAND_POLL_S:
                    self.handle_commands(0)
                    polled = started
                if self.ctx.stopping:
                    self.give_back(held[n:])
                    break
                self.run_one(job)
                took = time.monotonic() - started
                self._measure(took)
                if n + 1 < len(held) and took > 4 * PREFETCH_WINDOW_S and self._auto:
                    # Far slower than the batch was sized for: the rest would wait on this worker while others
                    # may be idle. Give it back for whoever is free (this worker included).
                    self.give_back(held[n + 1:])
                    break
                if self.pending and time.monotonic() - self.pending_since >= FLUSH_S:
                    self.flush()
        self.flush()
        self.log.info("worker.stopped")
        return EXIT_STOPPED

    @property
    def _auto(self) -> bool:
        return self.loaded.config.workers.prefetch == "auto"

    def batch_size(self) -> int:
        """How many jobs the next claim takes: the configured prefetch, or with "auto" enough for
        PREFETCH_WINDOW_S at the measured pace (one until a job has run)."""
        p = self.loaded.config.workers.prefetch
        if p != "auto":
            return p
        if self.pace is None:
            return 1
        return max(1, min(PREFETCH_AUTO_MAX, int(PREFETCH_WINDOW_S / max(self.pace, 1e-7))))

    def _measure(self, took: float) -> None:
        """A moving average that follows a slowdown faster than a speed-up (a single slow job is handled by giving
        its batch back, not by shrinking every batch after it)."""
        if self.pace is None:
            self.pace = took
        else:
            alpha = 0.5 if took > self.pace else 0.2
            self.pace += alpha * (took - self.pace)

    def give_back(self, held: list[jobs.Claimed]) -> None:
        """Put claimed jobs that never started back in the queue, untouched, and wake the idle workers."""
        self.flush()
        rest = [(j.id, j.token) for j in held]
        self.durable("give back", lambda: jobs.give_back(self.db, rest))
        doorbell.ring(self.loaded.run_dir)

    def handle_commands(self, wait_s: float) -> None:
        """Act on every command waiting (waiting up to wait_s for the first)."""
        channel = self.ctx.channel
        while channel.poll(wait_s):
            wait_s = 0
            msg = channel.recv()
            if msg is None:  # the supervisor is gone: stop (PDEATHSIG normally got here first)
                self.ctx.stop_requested[0] = True
                return
            cmd = msg.get("cmd")
            if cmd == "stop":
                self.ctx.stop_requested[0] = True
            elif cmd == "config":
                self.apply_config(msg)

    def apply_config(self, msg: dict[str, Any]) -> None:
        """A reloaded config. The supervisor validated it (handler import included); should it still not apply
        here, keep running on the old one and say so."""
        try:
            config = parse_config(msg["text"].encode(), msg.get("path") or "config.toml")
            handler = self.handler
            if config.workers.handler != self.loaded.config.workers.handler:
                handler = load_handler(config.workers.handler)
        except ConfigError as e:
            self.log.error("worker.config_rejected", reason=str(e), kept_digest=self.loaded.digest)
            return
        if config.log.level != self.loaded.config.log.level:
            logs.set_level(config.log.level)
        self.loaded = LoadedConfig(config, self.loaded.path, msg["digest"], self.loaded.explicit)
        self.handler = handler
        if self.client is not None:  # gate timeouts and shards come from the config: connect afresh
            self.client.close()
            self.client = None
        self.log.info("worker.config_applied", digest=msg["digest"])

    def gate(self, kind: str) -> Any:
        """The concurrency gate configured for this job kind, held around the handler call so the limit on
        concurrent upstream calls holds across every worker (none: a no-op)."""
        w = self.loaded.config.workers
        name = w.gate_by_kind.get(kind, w.gate)
        if not name or self.loaded.config.actors.ratelimit_shards < 1:
            return contextlib.nullcontext()
        if self.client is None:
            self.client = ActorClient.from_config(self.loaded, name=self.owner)
        return self.client.gate(name)

    def run_one(self, claimed: jobs.Claimed) -> None:
        w = self.loaded.config.workers
        structlog.contextvars.bind_contextvars(job_id=claimed.id)
        try:
            self._attempt(claimed, w.job_timeout_s)
        finally:
            structlog.contextvars.unbind_contextvars("job_id")
            self.ctx.slot.end()

    def claim_next(self) -> list[jobs.Claimed]:
        """Commit the finished jobs' results and claim the next jobs, in one transaction."""
        w = self.loaded.config.workers
        batch, took = self.pending, self.took  # cleared only once committed: a failed write is tried again
        k = self.batch_size()
        lost, held = self.durable("finish and claim", lambda: jobs.finish_and_claim(
            self.db, batch, self.owner, k=k, lease_s=w.lease_s,
            horizon_s=max(w.backoff_max_s, RETRY_AFTER_MAX_S) + 1, took=took))
        self.pending, self.took = [], {}
        self._report(batch, lost)
        return held

    def flush(self) -> None:
        """Commit every finished job's result in one transaction (a job whose lease was lost is reported)."""
        if self.pending:
            batch, took = self.pending, self.took
            lost = self.durable("store results", lambda: jobs.complete_many(self.db, batch, took=took))
            self.pending, self.took = [], {}
            self._report(batch, lost)

    def durable(self, what: str, write: Callable[[], T]) -> T:
        """Run a store write; while the database cannot take it — its disk full, its file system read-only, or
        locked past every retry — wait and try again (0.2 s doubling to 5 s), instead of exiting: a worker that
        exits gives its jobs back with a write that fails the same way, and its restarts become a crash loop.
        The results in hand stay in memory until they are stored; the slot says "blocked" meanwhile.

        A stop that comes while blocked ends the wait: what was not stored is lost from here, but not from the
        queue (its jobs are still the leases' and run again once recovered)."""
        delay, since = STORE_RETRY_FIRST_S, None
        while True:
            try:
                out = write()
            except (StoreUnwritable, StoreBusy) as e:
                if since is None:
                    since = time.monotonic()
                    self.ctx.slot.blocked(True)
                    self.title.state("blocked")  # on the database (as the slot says)
                    self.log.error("worker.blocked", waiting_to=what, reason=str(e),
                                   retrying="every few seconds, until the database takes writes again")
                self.handle_commands(delay)
                if self.ctx.stopping:
                    self.log.warning("worker.stopped_blocked", unstored_results=len(self.pending),
                                     reason="stopped while the database took no writes; their jobs run again")
                    self.pending, self.took = [], {}
                    raise
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                continue
            if since is not None:
                self.ctx.slot.blocked(False)
                self.log.warning("worker.unblocked", waited_s=round(time.monotonic() - since, 1), was_waiting_to=what)
            return out

    def _report(self, batch: list[tuple[int, int, Any]], lost: list[int]) -> None:
        for job_id in lost:
            self.log.warning("job.lease_lost", job_id=job_id,
                             reason="recovered, cancelled or claimed again; result discarded")
        self.ctx.slot.add_done(len(batch) - len(lost))

    def _attempt(self, claimed: jobs.Claimed, timeout_s: float) -> str:
        gated = False
        try:
            payload = orjson.loads(claimed.payload)
            job = Job(claimed.id, claimed.user_id, claimed.plan, claimed.kind, payload, claimed.attempt,
                      claimed.max_attempts, self.loaded.config, self.loaded.config_dir)
            with self.gate(claimed.kind):
                gated = True
                # The job's clock (the supervisor's timeout, the poison-job count) starts once the gate is ours:
                # waiting for a permit is not the handler running.
                self.ctx.slot.begin(claimed.id, time.monotonic())  # see Supervisor._enforce_timeouts
                self.title.job(claimed.id)
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                began = time.perf_counter()
                try:
                    result = self.handler(job)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    ran = time.perf_counter() - began
                    # The handler is done: a death from here on (say, while the gate is given back to a stalled
                    # actor) is not this job's fault and must not count towards its poison kills.
                    self.ctx.slot.end()
        except JobTimeout:
            return self._fail(claimed, f"timeout: the handler ran longer than job_timeout_s={timeout_s:g}")
        except PermanentError as e:
            return self._fail(claimed, f"permanent: {e}", permanent=True)
        except RetryAfter as e:
            wait = min(e.seconds, RETRY_AFTER_MAX_S)
            return self._fail(claimed, f"retry after {wait:g}s: {e}", not_before_s=wait)
        except ActorError as e:
            if gated:  # the handler's own call failed: its failure
                return self._fail(claimed, f"{type(e).__name__}: {e}")
            # No permit: the gate's queue was full, no permit came within its wait, or its actor could not be
            # reached. The handler never ran: not an attempt of the job's. Give it back untouched and wait a
            # moment before claiming again (a job must not go dead of waiting at a busy gate).
            self.durable("give back", lambda: jobs.give_back(self.db, [(claimed.id, claimed.token)]))
            self.log.warning("job.given_back", reason=f"gate: {e}"[:300])
            self.handle_commands(GATE_UNAVAILABLE_PAUSE_S)
            return "given back"
        except Exception as e:  # the handler's failure is data (the job's error), not the worker's
            return self._fail(claimed, f"{type(e).__name__}: {e}")
        try:
            jsonshape.encode(result)
        except ValueError as e:  # a result that cannot be stored is the handler's bug: permanent
            return self._fail(claimed, f"permanent: the handler's result cannot be stored: {e}", permanent=True)
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((claimed.id, claimed.token, result))
        self.took[claimed.id] = (claimed.kind, ran)
        if self.loaded.config.log.level == "debug":  # (the lazy logger resolves itself at each call: ~3 µs)
            self.log.debug("job.done", attempt=claimed.attempt)
        return "pending"

    def _fail(self, claimed: jobs.Claimed, error: str, permanent: bool = False, not_before_s: float = 0.0) -> str:
        try:
            out = self.durable("record a failure", lambda: jobs.fail(
                self.db, claimed.id, claimed.token, error, permanent=permanent, backoff=self.backoff, rng=self.rng,
                not_before_s=not_before_s))
        except LeaseLost as e:
            self.log.warning("job.lease_lost", reason=str(e))
            return "lost"
        if out.status != "dead":
            doorbell.ring(self.loaded.run_dir)  # a retry: now (idle workers) or at run_at (the supervisor's timer)
        level = "error" if out.status == "dead" else "warning"
        getattr(self.log, level)("job.failed", error=error, attempt=claimed.attempt, next=out.status,
                                 run_at=out.run_at)
        return "dead" if out.status == "dead" else "retry"


def main(ctx: ChildContext) -> int:
    """Child target ("cardq.worker:main")."""
    log = logs.get()
    try:
        worker = Worker(ctx)
    except ConfigError as e:
        log.error("worker.config_error", reason=str(e))
        return EXIT_CONFIG
    except Error as e:
        log.error("worker.store_error", reason=str(e))
        return EXIT_STORE
    try:
        return worker.run()
    except (StoreUnwritable, StoreBusy):
        return EXIT_STOPPED  # asked to stop while blocked (see Worker.durable): already logged
    except StoreError as e:
        # The database failed under us in a way waiting does not mend (corrupt, replaced): exit, and let the
        # supervisor release what we held and start a fresh worker.
        log.error("worker.store_error", reason=str(e))
        return EXIT_STORE
    finally:
        worker.db.close()
