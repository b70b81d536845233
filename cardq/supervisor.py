"""The supervisor: spawns and watches the worker processes, and owns everything that must survive them.

Policy (cardq/restarts.py): workers and actors are permanent children, restarted after a growing delay;
more than max_restarts restarts within max_seconds and the supervisor stops every child and run() raises
RestartIntensityExceeded, so that systemd can escalate. When a worker dies, the jobs it held are released by
owner name at once: the one it was running fails its attempt (and, as its worker died under it, gains a kill — at
poison_kills it is dead), the prefetched rest go back to the queue untouched. Leases of live workers are renewed
here, so a worker never needs a second thread.

The loop: `run()` waits on every child's pipes and sentinel plus a signal wake-up fd, then calls `step(now)`,
which does all the work and can be called by tests with a chosen time. Signal handlers only set flags. Beside
this file: restarts.py (the restart policy), maintenance.py (periodic work on the database), wakeups.py (when to
wake idle workers), reload.py (reading a new config), children.py (how a child starts and talks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from cardq import app, children, logs
from cardq.actors import keys
from cardq.children import EXIT_CONFIG, EXIT_STORE, Channel, ChildSpec, describe_exit
from cardq.config import LoadedConfig
from cardq.errors import ConfigError, Error, StoreError
from cardq.lockfile import SupervisorLock
from cardq.maintenance import Maintenance
from cardq.reload import actor_shards, read_new_config
from cardq.restarts import RestartPolicy
from cardq.store import dead_letters, jobs, processes, usage
from cardq.wakeups import Wakeups

OWNER_PREFIX = "cardq:"
IDLE_TICK_S = 0.002  # with an idle worker: how often PRAGMA data_version is compared (a cheap shared-memory read)
BUSY_TICK_S = 0.05


@dataclass
class ChildState:
    spec: ChildSpec
    proc: BaseProcess | None = None
    channel: Channel | None = None
    log_conn: Connection | None = None
    slot: children.Slot | None = None
    state: str = "starting"  # starting, idle, busy, stopping, restarting, stopped
    owner: str = ""
    incarnation: int = 0
    current_job: int | None = None
    job_started: float | None = None  # epoch seconds, as the worker wrote it
    jobs_done: int = 0
    restarts: int = 0
    last_exit: str | None = None
    started_at: float | None = None  # wall clock
    kill_reason: str | None = None  # "timeout" or "shutdown" when the supervisor killed it
    jobs_done_base: int = 0  # jobs done by earlier incarnations (the slot counts this one's)
    retiring: bool = False  # scaled away or shutting down: not restarted

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.exitcode is None


class Supervisor:
    def __init__(self, loaded: LoadedConfig, *, workers: int | None = None, burst: bool = False,
                 on_progress: Callable[[int], None] | None = None,
                 log_sink: Callable[[bytes], None] | None = None):
        self.loaded = loaded
        self.sink_put = log_sink or (lambda line: None)  # where children's log lines go (the one writer)
        self.desired = workers if workers is not None else loaded.config.workers.count
        self.burst = burst
        self.on_progress = on_progress
        self.run_id = f"{os.getpid()}.{int(time.time() * 1000)}"
        self.children: dict[str, ChildState] = {}
        sup = loaded.config.supervisor
        self.restarts = RestartPolicy(self._spawn_named, max_restarts=sup.max_restarts, max_seconds=sup.max_seconds,
                                      backoff_max_s=sup.restart_backoff_max_s)
        self.flags = {"term": 0, "int": 0, "hup": 0}
        self.config_version = 1
        self.config_loaded_at = time.time()
        self.last_reload_error: str | None = None
        self.stopping = False
        self.stop_reason = ""
        self.failure: Error | None = None  # why the supervisor stopped, when it is a failure run() raises
        self.shutdown_deadline: float | None = None
        self.started_at = time.time()
        self.maintenance: Maintenance | None = None
        self.wakeups: Wakeups | None = None
        self.done_total = 0
        self.log = logs.get()
        self.lock = SupervisorLock(loaded.db_path)
        self.db = None
        self._wake_r, self._wake_w = -1, -1
        self._previous_handlers: dict[int, Any] = {}

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.lock.acquire()
        try:
            keys.ensure_run_dir(self.loaded.run_dir)
            self.db = app.open_db(self.loaded, create=True)
            self.maintenance = Maintenance(self.db, self.loaded, self.log, owners=self._live_owners,
                                           publish=self._publish)
            self.wakeups = Wakeups(self.db)
            orphans = jobs.recover_orphans(self.db, owner_prefix=OWNER_PREFIX, current_prefix=self.prefix)
            expired = jobs.recover(self.db, processing_timeout_s=self.maintenance.processing_timeout())
        except BaseException:
            self.lock.release()
            raise
        self.log.info("supervisor.started", run_id=self.run_id, workers=self.desired, burst=self.burst,
                      config=self.loaded.source, config_digest=self.loaded.digest, database=str(self.loaded.db_path),
                      recovered_orphans=orphans.total, recovered_expired=expired.total)
        self._install_signals()

    def close(self) -> None:
        for child in self.children.values():
            if child.alive:
                child.proc.kill()
                child.proc.join(2)
        if self.db is not None:
            try:
                processes.clear(self.db)
            except StoreError as e:
                self.log.error("supervisor.status_clear_failed", reason=str(e))
            self.db.close()
            self.db = None
        self.lock.release()
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        if self._wake_r >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def run(self) -> None:
        """Start, supervise until told to stop (or, with burst, until the queue is drained). Raises the failure
        that stopped it, if one did (RestartIntensityExceeded, ConfigError)."""
        self.start()
        try:
            while not self.step(time.monotonic()):
                self._wait(IDLE_TICK_S if self._any_idle() else BUSY_TICK_S)
            self.log.info("supervisor.exit", reason=self.stop_reason, failed=self.failure is not None)
        finally:
            self.close()
        if self.failure is not None:
            raise self.failure

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum, flag in ((signal.SIGTERM, "term"), (signal.SIGINT, "int"), (signal.SIGHUP, "hup")):
            self._previous_handlers[signum] = signal.signal(signum, self._flag_setter(flag))

    def _flag_setter(self, flag: str) -> Callable[[int, object], None]:
        def handler(_signum: int, _frame: object) -> None:
            self.flags[flag] += 1  # only a flag: step() acts on it

        return handler

    def _wait(self, timeout: float) -> None:
        waitables: list[Any] = [self._wake_r]
        for child in self.children.values():
            waitables += [c for c in (child.channel.conn if child.channel else None, child.log_conn) if c]
            if child.alive:
                waitables.append(child.proc.sentinel)
        for ready in wait(waitables, timeout):
            if ready == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                continue
            for child in self.children.values():
                if child.channel is not None and ready is child.channel.conn:
                    self._drain_events(child)
                elif ready is child.log_conn:
                    self._drain_logs(child)

    # ---- one step ---------------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"{OWNER_PREFIX}{self.run_id}:"

    def step(self, now: float) -> bool:
        """Everything the supervisor does, for monotonic time `now`. True once it has finished."""
        self._act_on_signals(now)
        self._read_slots()
        for child in list(self.children.values()):
            if child.proc is not None and not child.alive:
                self._on_exit(child, now)
        if self.stopping:
            return self._step_shutdown(now)
        self._ensure_actors(now)
        self._scale(now)
        self.restarts.step(now)
        self._enforce_timeouts(now)
        self.maintenance.step(now)
        self._wake_idle()
        if self.burst and self._drained():
            self._begin_shutdown(now, "burst: no job left to run")
        return False

    def _act_on_signals(self, now: float) -> None:
        if self.flags["hup"]:
            self.flags["hup"] = 0
            self.reload(now)
        stops = self.flags["term"] + self.flags["int"]
        if stops and not self.stopping:
            self._begin_shutdown(now, "signal: stopping after in-flight jobs")
        if self.flags["int"] >= 2 and self.shutdown_deadline is not None and self.shutdown_deadline > now:
            self.log.warning("supervisor.stop_now", reason="second SIGINT")
            self.shutdown_deadline = now  # kill what remains at once; its jobs are requeued

    def _begin_shutdown(self, now: float, reason: str, failure: Error | None = None, immediate: bool = False) -> None:
        if self.stopping:
            return
        self.stopping, self.stop_reason, self.failure = True, reason, failure
        timeout = 0.0 if immediate else self.loaded.config.supervisor.shutdown_timeout_s
        self.shutdown_deadline = now + timeout
        self.log.info("supervisor.stopping", reason=reason, shutdown_timeout_s=timeout)
        # Workers first; the actors they use (gates, counters) stop once the last worker has gone.
        for child in self.children.values():
            child.retiring = True
            self.restarts.cancel(child.spec.name)
            if not child.alive:
                child.state = "stopped"
            elif child.spec.role == "worker":
                child.state = "stopping"
                child.channel.send({"cmd": "stop"})
        self._publish()

    def _step_shutdown(self, now: float) -> bool:
        if not any(c.alive and c.spec.role == "worker" for c in self.children.values()):
            for child in self.children.values():
                if child.alive and child.state != "stopping":
                    child.state = "stopping"
                    child.channel.send({"cmd": "stop"})
        live = [c for c in self.children.values() if c.alive]
        if not live:
            for child in self.children.values():
                if child.proc is not None:  # exited since this step's reaping: release and log it too
                    self._on_exit(child, now)
            return True
        if now >= self.shutdown_deadline:
            for child in live:
                if child.kill_reason is None:
                    child.kill_reason = "shutdown"
                    self.log.warning("child.killed", child=child.spec.name, child_pid=child.proc.pid,
                                     reason="shutdown timeout", job_id=child.current_job)
                    child.proc.kill()
        return False

    # ---- children ---------------------------------------------------------------------------------------

    def _ensure_actors(self, now: float) -> None:
        """One permanent child per actor shard (shard counts apply at start: a reload that changes them is
        logged as needing a restart)."""
        for actor, shards in actor_shards(self.loaded).items():
            for shard in range(shards):
                name = f"{actor}-{shard}"
                if name not in self.children:
                    spec = ChildSpec(name=name, role="actor", target="cardq.actors.server:main",
                                     args={"actor": actor, "shard": shard})
                    self.children[name] = ChildState(spec)
                    self.restarts.start(name, now)

    def _scale(self, now: float) -> None:
        for slot in range(1, self.desired + 1):
            name = f"worker-{slot}"
            child = self.children.get(name)
            if child is None:
                spec = ChildSpec(name=name, role="worker", target="cardq.worker:main")
                self.children[name] = ChildState(spec)
                self.restarts.start(name, now)
            elif child.retiring and child.alive:
                child.retiring = False  # scaled back up before it finished stopping: keep it
        for name, child in self.children.items():
            slot = int(name.rsplit("-", 1)[1])
            if child.spec.role == "worker" and slot > self.desired and not child.retiring:
                child.retiring = True
                self.restarts.cancel(name)
                if child.alive:
                    child.state = "stopping"
                    child.channel.send({"cmd": "stop"})
        for name in [n for n, c in self.children.items() if c.retiring and c.proc is not None and not c.alive]:
            del self.children[name]
        for name in [n for n, c in self.children.items() if c.retiring and c.proc is None]:
            del self.children[name]

    def _spawn_named(self, name: str) -> None:
        """The restart policy's spawn function."""
        child = self.children.get(name)
        if child is not None and child.proc is None and not child.retiring:
            self._spawn(child)

    def _spawn(self, child: ChildState) -> None:
        child.incarnation += 1
        child.owner = f"{self.prefix}{child.spec.name}.{child.incarnation}"
        spec = ChildSpec(child.spec.name, child.spec.role, child.spec.target, {**child.spec.args, "owner": child.owner})
        child.proc, child.channel, child.log_conn, child.slot = children.start(spec, self.loaded)
        child.jobs_done_base = child.jobs_done
        child.state, child.started_at = "starting", time.time()
        child.kill_reason, child.current_job, child.job_started = None, None, None
        self.log.info("child.started", child=spec.name, child_pid=child.proc.pid, owner=child.owner)

    def _on_exit(self, child: ChildState, now: float) -> None:
        proc = child.proc
        code = proc.exitcode
        reason = describe_exit(code, child.kill_reason)
        self._drain_events(child)
        self._drain_logs(child)
        self._release(child, code, reason)
        child.last_exit = reason
        child.proc, child.slot = None, None
        for conn in (child.channel.conn if child.channel else None, child.log_conn):
            if conn is not None:
                conn.close()
        child.channel, child.log_conn = None, None
        level = "info" if code == 0 or child.retiring else "warning"
        getattr(self.log, level)("child.exited", child=child.spec.name, child_pid=proc.pid, reason=reason)
        if child.retiring or self.stopping:
            child.state = "stopped"
            return
        if code == EXIT_CONFIG:
            why = f"{child.spec.name} cannot run with this config (see its log)"
            self._begin_shutdown(now, why, ConfigError(why), immediate=True)
            return
        try:
            self.restarts.exited(child.spec.name, now, reason)
        except Error as e:  # restart intensity exceeded: stop everything, and say why
            child.state = "stopped"
            self._begin_shutdown(now, str(e), e)
            return
        child.restarts += 1
        child.state = "restarting"

    def _release(self, child: ChildState, code: int | None, reason: str) -> None:
        """Take back whatever the dead child held, by owner name (works even if none of its messages arrived)."""
        if child.spec.role == "actor":
            self._record_actor_death(child, code, reason)
            return
        sup = self.loaded.config.supervisor
        running = child.current_job
        killed = False
        if child.kill_reason == "timeout":
            timeout = self.loaded.config.workers.job_timeout_s
            reason = f"timeout: the handler ran past job_timeout_s={timeout:g} and did not return; worker killed"
        elif child.kill_reason == "shutdown" or code in (0, EXIT_STORE, EXIT_CONFIG):
            running = None  # not the job's fault: give it back untouched
        else:
            killed = True
        try:
            out = jobs.release_owner(self.db, child.owner, running=running, error=reason, killed=killed,
                                     poison_kills=sup.poison_kills, backoff=self._backoff())
        except StoreError as e:  # the leases stop being renewed, so `recover` takes them back later
            self.log.error("child.release_failed", child=child.spec.name, reason=str(e))
            return
        if out.failed is not None or out.given_back:
            self.log.info("child.jobs_released", child=child.spec.name, job_id=running,
                          job_now=out.failed.status if out.failed else None, given_back=out.given_back)

    def _record_actor_death(self, child: ChildState, code: int | None, reason: str) -> None:
        """An actor that died while handling a message (its slot names it) counts one failure for that message:
        at 3 the restarted actor dead-letters it instead of dying on it again."""
        fp = child.current_job
        if fp is None or code == 0:
            return
        fingerprint = f"{fp:012x}"
        self.maintenance.call("actor_failure", lambda: dead_letters.count_failure(
            self.db, child.spec.args["actor"], fingerprint, f"killed its actor: {reason}", time.time()))
        self.log.warning("actor.died_in_message", child=child.spec.name, fingerprint=fingerprint, reason=reason)

    def _enforce_timeouts(self, now: float) -> None:
        limit = self.loaded.config.workers.job_timeout_s + self.loaded.config.supervisor.timeout_grace_s
        wall = time.time()
        for child in self.children.values():
            if child.alive and child.job_started is not None and child.kill_reason is None \
                    and wall - child.job_started > limit:
                child.kill_reason = "timeout"
                self.log.warning("child.killed", child=child.spec.name, child_pid=child.proc.pid,
                                 job_id=child.current_job, reason=f"handler still running {limit:g}s after it started")
                child.proc.kill()

    # ---- events from children ---------------------------------------------------------------------------

    def _drain_events(self, child: ChildState) -> None:
        channel = child.channel
        while channel is not None and channel.poll(0):
            msg = channel.recv()
            if msg is None:
                break
            self._on_event(child, msg)

    def _on_event(self, child: ChildState, msg: dict[str, Any]) -> None:
        if msg.get("ev") == "idle" and child.state != "stopping":
            child.state = "idle"

    def _read_slots(self) -> None:
        """What each worker is doing, from its shared-memory slot (no message per job)."""
        for child in self.children.values():
            if child.slot is None:
                continue
            job, started, done, state = child.slot.read()
            child.current_job, child.job_started = job, started
            if child.state not in ("stopping", "stopped", "restarting"):
                child.state = "busy" if job else state
            delta = child.jobs_done_base + done - child.jobs_done
            if delta > 0:
                child.jobs_done += delta
                self.done_total += delta
                if self.on_progress is not None:
                    self.on_progress(delta)

    def _drain_logs(self, child: ChildState) -> None:
        conn = child.log_conn
        while conn is not None:
            try:
                if not conn.poll(0):
                    return
                self.sink_put(conn.recv_bytes())
            except (EOFError, OSError):
                conn.close()
                child.log_conn = None
                return


    # ---- periodic work ----------------------------------------------------------------------------------

    def _live_owners(self) -> list[str]:
        return [c.owner for c in self.children.values() if c.alive]

    def _wake_idle(self) -> None:
        idle = [c for c in self.children.values() if c.alive and c.state == "idle" and c.spec.role == "worker"]
        if idle and self.maintenance.call("wakeups", self.wakeups.due):
            for child in idle:
                child.channel.send({"cmd": "wake"})

    def _drained(self) -> bool:
        workers = [c for c in self.children.values() if not c.retiring and c.spec.role == "worker"]
        if not workers or any(not c.alive or c.state != "idle" for c in workers):
            return False
        return self.maintenance.call("pending", lambda: usage.pending_total(self.db)) == 0

    def _any_idle(self) -> bool:
        return any(c.state == "idle" and c.spec.role == "worker" for c in self.children.values())

    def _backoff(self) -> jobs.Backoff:
        w = self.loaded.config.workers
        return jobs.Backoff(w.backoff_base_s, w.backoff_max_s)

    # ---- config -----------------------------------------------------------------------------------------

    def reload(self, now: float) -> None:
        """SIGHUP: re-read the config file. A broken file is refused and the running config kept."""
        if self.loaded.path is None:
            self.log.warning("config.reload_skipped", reason="running on built-in defaults: no file to re-read")
            return
        try:
            r = read_new_config(self.loaded)
        except Error as e:
            self.last_reload_error = str(e)
            self.log.error("config.reload_failed", reason=str(e), kept_digest=self.loaded.digest)
            self._publish()
            return
        for reason, keys_ in r.restart_needed.items():
            self.log.warning("config.restart_needed", reason=reason, keys=keys_)
        new = r.new
        if new.config.workers.count != self.loaded.config.workers.count:
            self.desired = new.config.workers.count
        self.loaded = self.maintenance.loaded = new
        sup = new.config.supervisor
        self.restarts.configure(max_restarts=sup.max_restarts, max_seconds=sup.max_seconds,
                                backoff_max_s=sup.restart_backoff_max_s)
        self.config_version += 1
        self.config_loaded_at = time.time()
        self.last_reload_error = None
        text = new.raw.decode()  # exactly the bytes validated above, not the file as it may be now
        for child in self.children.values():
            if child.alive:
                child.channel.send({"cmd": "config", "text": text, "path": str(new.path), "digest": new.digest})
        self.log.info("config.reloaded", version=self.config_version, digest=new.digest,
                      changes={k: [old, new_v] for k, (old, new_v) in r.changes.items()})
        self._publish()

    # ---- status -----------------------------------------------------------------------------------------

    def _publish(self) -> None:
        rows = [processes.ProcessRow(
            name="supervisor", role="supervisor", pid=os.getpid(),
            state="stopping" if self.stopping else "running", started_at=self.started_at,
            restarts=self.restarts.restarts_in_window,
            info={"run_id": self.run_id, "config_file": self.loaded.source, "config_digest": self.loaded.digest,
                  "config_version": self.config_version, "config_loaded_at": self.config_loaded_at,
                  "last_reload_error": self.last_reload_error, "workers_desired": self.desired,
                  "burst": self.burst})]
        for child in sorted(self.children.values(), key=lambda c: c.spec.name):
            rows.append(processes.ProcessRow(
                name=child.spec.name, role=child.spec.role, pid=child.proc.pid if child.alive else None,
                state=child.state, current_job=child.current_job, jobs_done=child.jobs_done,
                restarts=child.restarts, last_exit=child.last_exit, started_at=child.started_at))
        self.maintenance.call("publish", lambda: processes.publish(self.db, rows))


__all__ = ["Supervisor"]
