"""The supervisor: spawns and watches the worker processes, and owns everything that must survive them.

Policy (cardq/restarts.py): workers and actors are permanent children, restarted after a growing delay;
more than max_restarts restarts within max_seconds and the supervisor stops every child and run() raises
RestartIntensityExceeded, so that systemd can escalate. When a worker dies, the jobs it held are released by
owner name at once: the one it was running fails its attempt (and, as its worker died under it, gains a kill — at
poison_kills it is dead), the prefetched rest go back to the queue untouched. Leases of live workers are renewed
here, so a worker never needs a second thread.

The loop: `run()` waits on every child's pipes and sentinel plus a signal wake-up fd, then calls `step(now)`,
which does all the work and can be called by tests with a chosen time. Beside this file: restarts.py (the restart
policy), releases.py (a dead child's work), maintenance.py (periodic work on the database), wakeups.py (when to
wake idle workers), reload.py (reading a new config), signals.py (handlers that only count), tracked.py (a child
as tracked here), children.py (how a child starts and talks), sdnotify.py (what systemd is told).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import orjson

from cardq import app, children, logs
from cardq.actors import keys
from cardq.children import EXIT_CONFIG, ChildSpec, describe_exit
from cardq.config import LoadedConfig, running_record_path
from cardq.doorbell import DOORBELL, Doorbell
from cardq.errors import ConfigError, Error, FileError, StoreError
from cardq.handlers import HandlerCheck
from cardq.lockfile import SupervisorLock
from cardq.maintenance import Maintenance
from cardq.releases import release
from cardq.reload import Reload, actor_shards, read_new_config
from cardq.restarts import RestartPolicy
from cardq.sdnotify import Notifier
from cardq.signals import SignalFlags
from cardq.store import jobs, processes, usage
from cardq.tracked import TrackedChild
from cardq.wakeups import Wakeups

OWNER_PREFIX = "cardq:"
IDLE_TICK_S = 1.0  # with idle workers, the loop runs at least this often (checkpoints, the WAL's size, publishing)
QUIET_TICK_S = 5.0  # ... or this often once nothing at all has been written for QUIET_AFTER_S
QUIET_AFTER_S = 10.0
HEARTBEAT_S = 10.0  # the process table is rewritten when it changes, and at least this often
BUSY_TICK_S = 0.05
HTTP_CHILD = "http-0"  # the HTTP server (cardq/web/server.py), when [http] enabled


class Supervisor:
    def __init__(self, loaded: LoadedConfig, *, workers: int | None = None, burst: bool = False,
                 on_progress: Callable[[int], None] | None = None,
                 log_sink: Callable[[bytes], None] | None = None, log_destination: logs.Destination | None = None):
        self.loaded = loaded
        self.sink_put = log_sink or (lambda line: None)  # where children's log lines go (the one writer)
        self.log_destination = log_destination  # reopened on SIGHUP (logrotate) and when log.file changes
        self.secret = b""
        self.run_dir_check_at = 0.0
        self.reloads = 0  # reloads decided (applied or refused), published: `cardq reload` waits for the next
        self.reloads_applied = self.reloads_failed = 0  # the two outcomes, published for /metrics
        self.pending_reload: tuple[HandlerCheck, Reload] | None = None  # a new handler being checked in a child
        self.desired = workers if workers is not None else loaded.config.workers.count
        self.burst = burst
        self.on_progress = on_progress
        self.run_id = f"{os.getpid()}.{int(time.time() * 1000)}"
        self.children: dict[str, TrackedChild] = {}
        sup = loaded.config.supervisor
        self.restarts = RestartPolicy(self._spawn_named, max_restarts=sup.max_restarts, max_seconds=sup.max_seconds,
                                      backoff_max_s=sup.restart_backoff_max_s)
        self.signals = SignalFlags()
        self.interrupts = 0  # SIGINTs so far: the second one stops at once
        self.config_version = 1
        self.config_loaded_at = time.time()
        self.last_reload_error: str | None = None
        self.last_reload_at: float | None = None  # the last reload asked for, applied or refused
        self.stopping = False
        self.stop_reason = ""
        self.failure: Error | None = None  # why the supervisor stopped, when it is a failure run() raises
        self.shutdown_deadline: float | None = None
        self.started_at = time.time()
        self.maintenance: Maintenance | None = None
        self.wakeups: Wakeups | None = None
        self.doorbell: Doorbell | None = None
        self.wakeups_sent = 0  # idle workers woken (in status: what traffic does not cause)
        self.published: tuple[list[processes.ProcessRow], float] = ([], 0.0)  # last rows published, and when
        self.log = logs.get()
        self.notify = Notifier({}, self.log)  # systemd's, if it listens: made in start()
        self.lock = SupervisorLock(loaded.db_path)
        self.run_dir = loaded.run_dir  # resolved once (a key a reload cannot change)
        self.db = None

    # ---- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise Error("the supervisor runs in a process's main thread only: it handles SIGTERM, SIGINT and SIGHUP")
        self.lock.acquire()
        try:
            self.notify = Notifier(os.environ, self.log)
            keys.ensure_run_dir(self.run_dir)
            self.secret = keys.load_secret(self.run_dir)  # kept, to put the key back should it vanish
            self.db = app.open_db(self.loaded, create=True)
            self.maintenance = Maintenance(self.db, self.loaded, self.log, owners=self._live_owners,
                                           publish=self._publish)
            self.wakeups = Wakeups(self.db)
            self.doorbell = self._doorbell()
            orphans = jobs.recover_orphans(self.db, owner_prefix=OWNER_PREFIX, current_prefix=self.prefix)
            expired = jobs.recover(self.db, processing_timeout_s=self.maintenance.processing_timeout())
            self.signals.install()
            self._write_running_record()
        except BaseException:
            self.notify.close()
            self.signals.restore()
            if self.doorbell is not None:
                self.doorbell.close()
            if self.db is not None:
                self.db.close()
                self.db = None
            self.lock.release()
            raise
        self.log.info("supervisor.started", run_id=self.run_id, workers=self.desired, burst=self.burst,
                      config=self.loaded.source, config_digest=self.loaded.digest, database=str(self.loaded.db_path),
                      recovered_orphans=orphans.total, recovered_expired=expired.total)

    def _write_running_record(self) -> None:
        """What this supervisor runs, beside config.toml (see config.running_record_path)."""
        if self.loaded.path is None:
            return
        record = running_record_path(self.loaded.path)
        tmp = record.with_name(record.name + f".{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps({"pid": os.getpid(), "database": str(self.loaded.db_path),
                                      "config_digest": self.loaded.digest}))
            os.replace(tmp, record)
        except OSError as e:  # a convenience for the CLI, not a reason not to run
            self.log.warning("supervisor.record_failed", file=str(record), reason=e.strerror)

    def _remove_running_record(self) -> None:
        if self.loaded.path is not None:
            record = running_record_path(self.loaded.path)
            with contextlib.suppress(OSError):
                if orjson.loads(record.read_bytes()).get("pid") == os.getpid():
                    record.unlink()

    def close(self) -> None:
        self._remove_running_record()
        if self.pending_reload is not None:
            self.pending_reload[0].poll_and_stop()
            self.pending_reload = None
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
        if self.doorbell is not None:
            self.doorbell.close()
            self.doorbell = None
        self.notify.close()
        self.lock.release()
        self.signals.restore()

    def _doorbell(self) -> Doorbell:
        try:
            return Doorbell(self.run_dir)
        except OSError as e:
            raise FileError(self.run_dir / DOORBELL, "create the wake-up socket", e) from None

    def run(self) -> None:
        """Start, supervise until told to stop (or, with burst, until the queue is drained). Raises the failure
        that stopped it, if one did (RestartIntensityExceeded, ConfigError)."""
        title = children.set_title("supervisor")  # what `ps` shows; given back after (an app may run us in-process)
        try:
            self.start()
            try:
                if self.burst and self.maintenance.call("pending", lambda: usage.pending_total(self.db)) == 0:
                    # Nothing to run: say so and stop, rather than start a tree of processes to find it out.
                    self._begin_shutdown(time.monotonic(), "burst: no job to run")
                while not self.step(time.monotonic()):
                    self._wait(self._sleep_for(time.monotonic()))
                self.log.info("supervisor.exit", reason=self.stop_reason, failed=self.failure is not None)
            finally:
                self.close()
        finally:
            children.restore_title(title)
        if self.failure is not None:
            raise self.failure

    def _sleep_for(self, now: float) -> float:
        """How long the loop may wait for an event. With idle workers nothing needs polling: rings, children and
        signals wake it; the periodic work (checkpoints, the WAL's size, publishing) and the next restart or
        job in backoff set the pace — and systemd's watchdog, when it has one (none: no wake-up for it)."""
        if not self._any_idle():
            return min(BUSY_TICK_S, self.notify.seconds_to_next(now))
        # (each wake-up of an idle process costs ~0.5-3 ms of CPU on these VMs: a quiet tree wakes seldom)
        quiet = now - self.maintenance.written_at > QUIET_AFTER_S
        timeout = min(QUIET_TICK_S if quiet else IDLE_TICK_S, self.wakeups.seconds_to_next(),
                      self.notify.seconds_to_next(now))
        if self.restarts.due:
            timeout = min(timeout, max(0.0, min(self.restarts.due.values()) - now))
        return timeout

    def _wait(self, timeout: float) -> None:
        """Until a child says something, exits or logs, a signal arrives, or `timeout` passes."""
        waitables: list[Any] = [self.signals.wake_r, self.doorbell.sock]
        for child in self.children.values():
            waitables += child.waitables()
        for ready in wait(waitables, timeout):
            if ready == self.signals.wake_r:
                self.signals.drain()
                continue
            if ready is self.doorbell.sock:
                if self.doorbell.drain():
                    self.wakeups.rung = True
                continue
            for child in self.children.values():
                if child.channel is not None and ready is child.channel.conn:
                    child.drain_events()
                elif ready is child.log_conn:
                    child.drain_logs(self.sink_put)

    # ---- one step ---------------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"{OWNER_PREFIX}{self.run_id}:"

    def step(self, now: float) -> bool:
        """Everything the supervisor does, for monotonic time `now`. True once it has finished."""
        self._act_on_signals(now)
        self._poll_reload()
        self._read_slots()
        for child in list(self.children.values()):
            if child.proc is not None and not child.alive:
                self._on_exit(child, now)
        if self.stopping:
            finished = self._step_shutdown(now)
            self._notify(now)  # the watchdog's ping goes on while in-flight jobs finish
            return finished
        self._ensure_actors(now)
        self._ensure_http(now)
        self._scale(now)
        self.restarts.step(now)
        self._enforce_timeouts(now)
        self.maintenance.step(now)
        self._keep_run_dir(now)
        self._wake_idle()
        if self.burst and self._drained():
            self._begin_shutdown(now, "burst: no job left to run")
        self._notify(now)
        return False

    def _act_on_signals(self, now: float) -> None:
        if self.signals.take("hup"):
            self.reload(now)
        self.interrupts += self.signals.take("int")
        if (self.signals.take("term") or self.interrupts) and not self.stopping:
            self._begin_shutdown(now, "signal: stopping after in-flight jobs")
        if self.interrupts >= 2 and self.shutdown_deadline is not None and self.shutdown_deadline > now:
            self.log.warning("supervisor.stop_now", reason="second SIGINT")
            self.shutdown_deadline = now  # kill what remains at once; its jobs are requeued

    def _begin_shutdown(self, now: float, reason: str, failure: Error | None = None, immediate: bool = False) -> None:
        if self.stopping:
            return
        self.stopping, self.stop_reason, self.failure = True, reason, failure
        self.notify.stopping()
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
                    self.children[name] = TrackedChild(spec)
                    self.restarts.start(name, now)

    def _ensure_http(self, now: float) -> None:
        """The HTTP server ([http] enabled), a permanent child like the actors; a reload can turn it on or off.
        Not in burst mode: a burst drains the queue and exits, it serves nobody."""
        want = self.loaded.config.http.enabled and not self.burst
        child = self.children.get(HTTP_CHILD)
        if want and child is None:
            self.children[HTTP_CHILD] = TrackedChild(ChildSpec(name=HTTP_CHILD, role="http",
                                                               target="cardq.web.server:main"))
            self.restarts.start(HTTP_CHILD, now)
        elif want and child.retiring and child.alive:
            child.retiring = False
        elif not want and child is not None and not child.retiring:
            child.retiring = True
            self.restarts.cancel(HTTP_CHILD)
            if child.alive:
                child.state = "stopping"
                child.channel.send({"cmd": "stop"})

    def _scale(self, now: float) -> None:
        for slot in range(1, self.desired + 1):
            name = f"worker-{slot}"
            child = self.children.get(name)
            if child is None:
                spec = ChildSpec(name=name, role="worker", target="cardq.worker:main")
                self.children[name] = TrackedChild(spec)
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

    def _spawn(self, child: TrackedChild) -> None:
        child.incarnation += 1
        child.owner = f"{self.prefix}{child.spec.name}.{child.incarnation}"
        spec = ChildSpec(child.spec.name, child.spec.role, child.spec.target, {**child.spec.args, "owner": child.owner})
        child.proc, child.channel, child.log_conn, child.slot = children.start(spec, self.loaded)
        child.jobs_done_base = child.jobs_done
        child.state, child.started_at = "starting", time.time()
        child.kill_reason, child.current_job, child.job_started = None, None, None
        self.log.info("child.started", child=spec.name, child_pid=child.proc.pid, owner=child.owner)

    def _on_exit(self, child: TrackedChild, now: float) -> None:
        proc = child.proc
        code = proc.exitcode
        reason = describe_exit(code, child.kill_reason)
        child.drain_events()
        child.drain_logs(self.sink_put)
        release(self.db, self.loaded, self.log, child, code, reason)
        self.wakeups.rung = True  # what it held may be runnable again
        child.last_exit = reason
        child.forget_process()
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

    def _enforce_timeouts(self, now: float) -> None:
        """Kill a worker whose handler runs past job_timeout_s + timeout_grace_s. Both times are monotonic (the
        slot's start is CLOCK_MONOTONIC, the same clock in every process): a step of the wall clock (NTP, a VM
        resume) must not kill every busy worker as 'timeout'."""
        limit = self.loaded.config.workers.job_timeout_s + self.loaded.config.supervisor.timeout_grace_s
        for child in self.children.values():
            if child.alive and child.job_started is not None and child.kill_reason is None \
                    and now - child.job_started > limit:
                child.kill_reason = "timeout"
                self.log.warning("child.killed", child=child.spec.name, child_pid=child.proc.pid,
                                 job_id=child.current_job, reason=f"handler still running {limit:g}s after it started")
                child.proc.kill()

    def _read_slots(self) -> None:
        """What each child is doing, from its shared-memory slot (no message per job)."""
        for child in self.children.values():
            done = child.read_slot()
            if done and self.on_progress is not None:
                self.on_progress(done)

    # ---- periodic work ----------------------------------------------------------------------------------

    def _keep_run_dir(self, now: float) -> None:
        """The run directory and its key are ours: if someone deletes them, put them back (same key) within a
        second — actors then listen anew — rather than let workers fail jobs on 'gate: not reachable'."""
        if now < self.run_dir_check_at:
            return
        self.run_dir_check_at = now + 1.0
        try:
            if keys.restore(self.run_dir, self.secret):
                self.log.warning("run_dir.restored", run_dir=str(self.run_dir),
                                 reason="the run directory or its key file was gone")
            if self.doorbell.gone():  # (its socket file went with the folder)
                fresh = Doorbell(self.run_dir)
                self.doorbell.sock.close()
                self.doorbell, self.wakeups.rung = fresh, True
        except OSError as e:
            self.log.error("run_dir.restore_failed", run_dir=str(self.run_dir), reason=e.strerror)

    def _live_owners(self, busy_only: bool = False) -> list[str]:
        return [c.owner for c in self.children.values() if c.alive and not (busy_only and c.state == "idle")]

    def _wake_idle(self) -> None:
        idle = [c for c in self.children.values() if c.alive and c.state == "idle" and c.spec.role == "worker"]
        if idle and self.maintenance.call("wakeups", self.wakeups.due):
            for child in idle:
                # Never block on a child: one that does not read (it just claimed, and waits for a gate) has a
                # wake-up waiting already.
                self.wakeups_sent += child.channel.send_if_room({"cmd": "wake"})

    def _drained(self) -> bool:
        if self.desired == 0:
            return True  # no worker will run anything: burst has nothing to wait for
        workers = [c for c in self.children.values() if not c.retiring and c.spec.role == "worker"]
        if not workers or any(not c.alive or c.state != "idle" for c in workers):
            return False
        return self.maintenance.call("pending", lambda: usage.pending_total(self.db)) == 0

    def _any_idle(self) -> bool:
        return any(c.state == "idle" and c.spec.role == "worker" for c in self.children.values())

    # ---- config -----------------------------------------------------------------------------------------

    def reload(self, now: float) -> None:
        """SIGHUP: reopen the log file (after logrotate moved it away), then re-read the config file. A broken
        file is refused and the running config kept. A new handler is imported in a throwaway child first (a
        handler module may hang or exit at import); the loop goes on meanwhile, and the outcome comes later."""
        self.notify.reloading()
        self._reopen_log(self.loaded.config.log.file)
        if self.loaded.path is None:
            self.log.warning("config.reload_skipped", reason="running on built-in defaults: no file to re-read")
            self.notify.reloaded()
            return
        if self.pending_reload is not None:  # a newer SIGHUP: the file may have changed again
            self.pending_reload[0].poll_and_stop()
            self.pending_reload = None
        try:
            r = read_new_config(self.loaded)
        except Error as e:
            self._reload_refused(str(e))
            return
        if r.new.config.workers.handler != self.loaded.config.workers.handler:
            self.pending_reload = (HandlerCheck(r.new.config.workers.handler), r)
            return
        self._apply_reload(r)

    def _poll_reload(self) -> None:
        if self.pending_reload is None:
            return
        check, r = self.pending_reload
        outcome = check.poll()
        if outcome is None:
            return
        self.pending_reload = None
        if outcome:
            self._reload_refused(outcome)
        else:
            self._apply_reload(r)

    def _reload_refused(self, reason: str) -> None:
        self.reloads += 1
        self.reloads_failed += 1
        self.last_reload_at = time.time()
        self.last_reload_error = reason
        self.log.error("config.reload_failed", reason=reason, kept_digest=self.loaded.digest)
        self._publish()
        self.notify.reloaded()

    def _apply_reload(self, r: Reload) -> None:
        new = r.new
        if new.config.log.file != self.loaded.config.log.file:
            self._reopen_log(new.config.log.file)
        if new.config.log.level != self.loaded.config.log.level:
            logs.set_level(new.config.log.level)
        if new.config.workers.count != self.loaded.config.workers.count:
            self.desired = new.config.workers.count
        self.loaded = self.maintenance.loaded = new
        sup = new.config.supervisor
        self.restarts.configure(max_restarts=sup.max_restarts, max_seconds=sup.max_seconds,
                                backoff_max_s=sup.restart_backoff_max_s)
        self.reloads += 1
        self.reloads_applied += 1
        self.config_version += 1
        self.config_loaded_at = self.last_reload_at = time.time()
        self.last_reload_error = None
        text = new.raw.decode()  # exactly the bytes validated above, not the file as it may be now
        for child in self.children.values():
            if child.alive:
                child.channel.send({"cmd": "config", "text": text, "path": str(new.path), "digest": new.digest})
        self.log.info("config.reloaded", version=self.config_version, digest=new.digest,
                      changes={k: [old, new_v] for k, (old, new_v) in r.changes.items()})
        self._publish()
        self.notify.reloaded()

    def _reopen_log(self, path: str) -> None:
        if self.log_destination is None:
            return
        try:
            self.log_destination.reopen(path)
        except Error as e:  # keep logging where it did; say why
            self.log.error("log.reopen_failed", file=path, reason=str(e))

    # ---- status -----------------------------------------------------------------------------------------

    def _notify(self, now: float) -> None:
        if self.notify.enabled:
            self.notify.step(now, up=self._children_up, status=self._summary)

    def _children_up(self) -> bool:
        """Every permanent child started: actors listening (an actor's slot leaves "starting" after it listens
        and has run its first batch), workers past their start (their first claim)."""
        if self.stopping:
            return False  # (stopping children are retiring: none left to wait for is not "up")
        # Not the HTTP server: it may wait for its port for a long time (logged), and the job system does not.
        return all(c.alive and c.state != "starting" for c in self.children.values()
                   if not c.retiring and c.spec.role != "http")

    def _summary(self) -> str:
        """One line for `systemctl status`: "3 workers, 3 actors up, http up; 12 jobs pending, 3 running" (pending:
        queued, in backoff or claimed; running: a handler running now)."""
        up = [c for c in self.children.values() if c.alive and c.state != "starting"]
        workers = sum(c.spec.role == "worker" for c in up)
        actors = sum(c.spec.role == "actor" for c in up)
        running = sum(c.spec.role == "worker" and c.current_job is not None for c in up)
        pending = self.maintenance.call("pending", lambda: usage.pending_total(self.db))
        http = self.children.get(HTTP_CHILD)
        serving = "" if http is None else ", http up" if http in up else ", http not serving (see the log)"
        text = (f"{workers} workers, {actors} actors up{serving}; "
                f"{'?' if pending is None else pending} jobs pending, {running} running")
        return f"stopping ({self.stop_reason}): {text}" if self.stopping else text

    def _publish(self) -> None:
        rows = [processes.ProcessRow(
            name="supervisor", role="supervisor", pid=os.getpid(),
            state="stopping" if self.stopping else "running", started_at=self.started_at,
            restarts=self.restarts.restarts_in_window,
            info={"run_id": self.run_id, "config_file": self.loaded.source, "config_digest": self.loaded.digest,
                  "config_version": self.config_version, "config_loaded_at": self.config_loaded_at,
                  "last_reload_error": self.last_reload_error, "last_reload_at": self.last_reload_at,
                  "workers_desired": self.desired, "reloads": self.reloads, "reloads_applied": self.reloads_applied,
                  "reloads_failed": self.reloads_failed, "wakeups_sent": self.wakeups_sent,
                  "burst": self.burst})]
        for child in sorted(self.children.values(), key=lambda c: c.spec.name):
            rows.append(processes.ProcessRow(
                name=child.spec.name, role=child.spec.role, pid=child.proc.pid if child.alive else None,
                state=child.state, current_job=child.current_job, jobs_done=child.jobs_done,
                restarts=child.restarts, last_exit=child.last_exit, started_at=child.started_at,
                info={"connections_refused": child.connections_refused,
                      "connections_evicted": child.connections_evicted} if child.spec.role == "actor" else {}))
        # Nothing changed: rewrite the table only as a heartbeat (an idle tree writes nothing else).
        now = time.monotonic()
        if rows == self.published[0] and now < self.published[1] + HEARTBEAT_S:
            return
        self.maintenance.call("publish", lambda: processes.publish(self.db, rows))
        if "publish" not in self.maintenance.failing:
            self.published = (rows, now)


__all__ = ["Supervisor"]
