"""The public Python API: what apps, the CLI and (soon) the HTTP server call. `import cardq; q = cardq.connect()`.

One `Queue` may be shared by every thread of a threaded web app: each thread gets its own SQLite connection and
its own actor connections (neither is shareable), opened on first use; the event recorder is one per Queue and
takes events from any thread without a lock. After a fork (a pre-forking server), the child opens its own.

Limits follow the config in effect: before each operation that applies limits, the config file is looked at
(one stat); when it changed, it is read again, so the next submit applies what `cardq limits` shows without
restarting the app. A config file that became invalid is not applied: the last valid one stays in effect and
`config_error` says why.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from cardq import app
from cardq.config import LoadedConfig, resolve_config_path
from cardq.errors import ActorUnavailable, ConfigError, Error, InputError, JobNotFound, LimitExceeded
from cardq.store import Database, admin, processes, queries, totals, usage
from cardq.store import limits as store_limits
from cardq.store import submit as store_submit
from cardq.store.limits import Limit
from cardq.store.totals import Figures
from cardq.vocabulary import FINISHED, FORMATS, MAX_PRIORITY, STATUSES

# Loaded on first use (`cardq status` needs none of them): the actor client and the event recorder on the first
# actor call, the input parser and the doorbell on the first submit.
if TYPE_CHECKING:
    from cardq import inputs
    from cardq.actors.aioclient import AsyncActorClient
    from cardq.actors.client import ActorClient
    from cardq.actors.recorder import EventRecorder

WAIT_MIN_S, WAIT_MAX_S = 0.002, 0.1  # wait(): first and longest sleep between looks at the change token
# throughput(): a minute this long past its end is taken as complete: a worker stamps finished_at before its
# commit, which a busy database can hold back for a few seconds.
SETTLED_S = 10.0


class Batch(msgspec.Struct, frozen=True):
    """What a submit did: one id per item, in order (an existing job's id where its idempotency key was known),
    how many jobs it created and how many items mapped to existing jobs."""

    ids: list[int]
    created: int
    existing: int


class JobInfo(msgspec.Struct, frozen=True):
    """A job as an app sees it. payload, result and errors are None in lists (`Queue.jobs`)."""

    id: int
    user_id: str
    plan: str
    kind: str
    status: str  # queued, scheduled, processing, done, dead, cancelled
    priority: int
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    run_at: float
    idempotency_key: str | None
    lease_owner: str | None
    lease_until: float | None
    payload: Any = None
    result: Any = None
    errors: list[dict[str, Any]] | None = None  # the newest attempts' errors: {attempt, at, error}

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # (new containers: changing them leaves this value as it is)


class JobPage(msgspec.Struct, frozen=True):
    jobs: list[JobInfo]
    cursor: int | None  # pass as `cursor=` for the next page; None when this page is the last


class RateLimitDecision(msgspec.Struct, frozen=True):
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float  # when the same request would be allowed (0 when it is)
    reset_after_s: float  # when the key's whole burst is available again
    unavailable: bool = False  # allowed only because no rate limiter could be reached (on_unavailable="allow")
    policy: str = ""  # the [ratelimit] policy's key pattern that applied ("*": the default)
    window_s: float = 0.0  # that policy's window: `limit` per `window_s`

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # (new containers: changing them leaves this value as it is)


class CounterResult(msgspec.Struct, frozen=True):
    ok: bool
    value: int


class NewToken(msgspec.Struct, frozen=True):
    id: int
    token: str  # shown once: only its digest is stored
    scope: str
    name: str


class TokenInfo(msgspec.Struct, frozen=True):
    id: int
    name: str
    scope: str
    created_at: float
    revoked_at: float | None


class EventsRecorded(msgspec.Struct, frozen=True):
    ids: list[str]  # each event's idempotent id, in the order given
    accepted: int  # new events counted
    duplicates: int  # seen before (a retried payload): counted once
    late: int  # older than paths.retention_days: refused
    sampled_out: int
    to_inbox: int  # stored durably for the collector, which was not reachable; counted when it is back


class MetricsSnapshot(msgspec.Struct, frozen=True):
    """What /metrics shows, gathered across the processes that hold it (`Queue.metrics`)."""

    store: Figures  # the durable totals, the jobs in each state, the inbox, the files' sizes: one snapshot
    supervisor: dict[str, Any] | None  # the running supervisor's published info (config digest, reloads), or None
    children: list[dict[str, Any]]  # each child the supervisor published: name, role, pid, state, restarts
    actors: list[dict[str, Any]]  # each actor shard's "stats" answer, or {"actor", "shard", "error"}


class _PerThread(threading.local):
    pid: int = 0
    db: Database | None = None
    client: ActorClient | None = None
    client_generation: int = -1


class Queue:
    """A connection to one cardq deployment (its config file, database and actors). Thread-safe; close() it
    (or use it as a context manager) when the app stops."""

    def __init__(self, loaded: LoadedConfig, *, name: str = "app", config_error: str | None = None):
        self._loaded = loaded
        self.name = name
        self.config_error = config_error  # why the file on disk is not the config in effect, if it is not
        self._stamp = _stamp(loaded.path)
        self._generation = 0  # goes up with each config change: per-thread actor clients reconnect
        self._lock = threading.Lock()
        self._local = _PerThread()
        # What the threads opened, for close(). Weak: a thread that ends drops its connections with its
        # thread-local state (a thread-per-request server would otherwise pile up descriptors).
        self._opened: weakref.WeakSet[Database | ActorClient] = weakref.WeakSet()
        self._events: EventRecorder | None = None
        self._events_pid = 0
        self._loop_clients: dict[Any, tuple[int, AsyncActorClient]] = {}  # event loop -> (generation, its client)
        self._loop_looked: dict[Any, float] = {}  # event loop -> its clock when the config file was last looked at
        # Gate permits whose release failed (the actor was restarting): shared by every thread's client, so the
        # next gate call of ANY thread releases them — a thread that ends must not keep a permit for good.
        self._unreleased: list[tuple[str, str]] = []
        self._finished_minutes: dict[int, tuple[int, ...]] = {}  # throughput(): minute -> counts, once over
        self._closed = False
        self.ratelimit = RateLimits(self)
        self.counter = Counters(self)

    # ---- plumbing ---------------------------------------------------------------------------------------------

    @property
    def config(self) -> LoadedConfig:
        """The config in effect (re-read if the file changed since it was last looked at)."""
        self._follow_config()
        return self._loaded

    def _follow_config(self) -> None:
        path = self._loaded.path
        if path is None:
            return
        stamp = _stamp(path)

        def unchanged() -> bool:
            return stamp == self._stamp and not (_fresh(stamp) and _content(path) != self._loaded.raw)

        if unchanged():
            return
        with self._lock:
            if unchanged():  # another thread re-read it meanwhile
                return
            self._stamp = stamp
            try:
                new = app.load(path)
            except ConfigError as e:
                self.config_error = str(e)  # keep running on the last valid config, and say so
                return
            self.config_error = None
            if new.config.store != self._loaded.config.store:
                # Threads hold connections to the database in effect: they must all keep using the same one.
                self.config_error = (f"{path}: [store] changed; it applies when the app restarts (the rest of the "
                                     "file applies now)")
                new = LoadedConfig(msgspec.structs.replace(new.config, store=self._loaded.config.store), new.path,
                                   new.digest, new.explicit, new.raw)
            if new.digest != self._loaded.digest:
                self._loaded = new
                self._generation += 1

    def _db(self) -> Database:
        if self._closed:
            raise Error("this cardq Queue was closed; connect() again")
        local = self._local
        if local.pid != os.getpid():  # a new thread, or a forked child: never use the parent's connections
            local.pid, local.db, local.client, local.client_generation = os.getpid(), None, None, -1
        if local.db is None:
            local.db = app.open_db(self._loaded)
            # Closed when its thread ends and its state is collected (not only at exit) — never in a forked child.
            weakref.finalize(local.db, _close_in, os.getpid(), local.db.conn)
            with self._lock:
                self._opened.add(local.db)
        return local.db

    def _client(self) -> ActorClient:
        self._follow_config()
        self._db()  # resets the per-thread state after a fork
        local = self._local
        with self._lock:
            loaded, generation = self._loaded, self._generation  # read together: a client of one config
        if local.client is None or local.client_generation != generation:
            if local.client is not None:
                local.client.close()
            from cardq.actors.client import ActorClient

            local.client = ActorClient.from_config(loaded, name=f"{self.name}-{threading.get_ident()}",
                                                   unreleased=self._unreleased)
            local.client_generation = generation
            with self._lock:
                self._opened.add(local.client)
        if self._unreleased:  # permits whose release failed earlier (an actor restart): any call gives them back
            with contextlib.suppress(Error):
                local.client.release_leftovers()
        return local.client

    def _loop_client(self) -> AsyncActorClient:
        """The running event loop's actor client: one per loop, shared by its tasks (made anew after a config
        change, like the per-thread clients)."""
        if self._closed:
            raise Error("this cardq Queue was closed; connect() again")
        import asyncio

        from cardq.actors.aioclient import AsyncActorClient

        loop = asyncio.get_running_loop()
        now = loop.time()
        if now != self._loop_looked.get(loop):
            # The config file is looked at once per tick of the loop's clock, not once per call: uvloop's clock
            # moves once per turn of the loop (by milliseconds), and a turn may hold dozens of checks.
            self._follow_config()
            self._loop_looked[loop] = now
        entry = self._loop_clients.get(loop)
        if entry is not None and entry[0] == self._generation:
            return entry[1]
        with self._lock:
            loaded, generation = self._loaded, self._generation
            entry = self._loop_clients.get(loop)
            if entry is not None and entry[0] == generation:
                return entry[1]
            stale = [entry[1]] if entry is not None else []
            for other in [other for other in self._loop_clients if other.is_closed()]:  # loops that ended
                stale.append(self._loop_clients.pop(other)[1])
                self._loop_looked.pop(other, None)
            client = AsyncActorClient(loaded, name=f"{self.name}-loop")
            self._loop_clients[loop] = (generation, client)
        for old in stale:
            with contextlib.suppress(Exception):  # (a closed loop's transports are gone with it)
                old.close()
        return client

    def close(self) -> None:
        """Flush recorded events, give back permits whose release failed, close every connection this Queue
        opened (call it when the app stops). A closed Queue refuses further calls."""
        if self._closed:
            return
        if self._events is not None and self._events_pid == os.getpid():
            self._events.close()
        if self._unreleased:
            with contextlib.suppress(Error):
                self._client().release_leftovers()
        self._closed = True
        with self._lock:
            opened, self._opened = list(self._opened), weakref.WeakSet()
            opened += [client for _, client in self._loop_clients.values()]
            self._loop_clients.clear()
        for thing in opened:
            with contextlib.suppress(Exception):  # another thread's connection, mid-use at exit: nothing to save
                thing.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- jobs -------------------------------------------------------------------------------------------------

    def submit(self, items: Iterable[Mapping[str, Any]] | Sequence[inputs.Item], *, user: str, plan: str,
               kind: str = "card", priority: int = 0, idempotency_key_field: str | None = None,
               progress: Callable[[int], object] | None = None) -> Batch:
        """Submit a batch for one user, all or nothing, under the limits in effect now.

        Each item is a JSON object (a dict). With idempotency_key_field, an item whose value of that field the
        user already submitted maps to the existing job instead of creating a second one. Raises LimitExceeded
        (which limit, allowed, current, requested, resets_at) or InputError (which item, what is wrong); either
        way nothing was submitted.
        """
        from cardq import doorbell

        parsed = _parsed_items(items, idempotency_key_field)
        loaded = self.config
        r = store_submit.submit(self._db(), parsed, user_id=user, plan=plan, kind=kind, priority=priority,
                                max_attempts=loaded.config.workers.max_attempts,
                                configured=loaded.limit_values(), progress=progress)
        if r.created:
            doorbell.ring(loaded.run_dir)  # idle workers start on it now, not at their next look
        return Batch(r.ids, r.created, r.existing)

    def submit_many(self, requests: Sequence[Mapping[str, Any]]) -> list[Batch | InputError | LimitExceeded]:
        """Several submits in ONE transaction: one commit and one ring of the doorbell for all of them (for a
        server that takes submits from many clients at once). Each request is a dict of submit()'s arguments
        (items, user, plan, and optionally kind, priority, idempotency_key_field); each is all or nothing on its
        own, under the limits in effect, in order (each sees the ones before it). Its answer is its Batch, or the
        error submit() would have raised for it (InputError, LimitExceeded), in its place. A failure of the
        transaction itself (StoreBusy, ...) is raised: then none was submitted."""
        from cardq import doorbell

        loaded = self.config
        attempts = loaded.config.workers.max_attempts
        out: list[Batch | InputError | LimitExceeded | None] = [None] * len(requests)
        todo: list[tuple[int, store_submit.SubmitRequest]] = []
        for n, r in enumerate(requests):
            try:
                items = _parsed_items(r["items"], r.get("idempotency_key_field"))
                todo.append((n, store_submit.SubmitRequest(items, r["user"], r["plan"], r.get("kind", "card"),
                                                           r.get("priority", 0), attempts)))
            except InputError as e:
                out[n] = e
        done = store_submit.submit_many(self._db(), [req for _, req in todo], configured=loaded.limit_values())
        for (n, _), result in zip(todo, done, strict=True):
            out[n] = result if isinstance(result, Error) else Batch(result.ids, result.created, result.existing)
        if any(isinstance(b, Batch) and b.created for b in out):
            doorbell.ring(loaded.run_dir)  # idle workers start on them now, not at their next look
        return out  # type: ignore[return-value]  (every place filled)

    def submit_file(self, file: str | os.PathLike, *, user: str, plan: str, fmt: str = "auto",
                    idempotency_key_field: str | None = None, **kw: Any) -> Batch:
        """Submit a JSONL file, a JSON array or a CSV with a header ("-": standard input) as one batch; a bad
        line rejects the whole batch, naming the line."""
        items = read_items(file, fmt=fmt, idempotency_key_field=idempotency_key_field)
        return self.submit(items, user=user, plan=plan, **kw)

    def pending(self) -> int:
        """Jobs queued, scheduled or processing, over all users."""
        return usage.pending_total(self._db())

    def job(self, job_id: int) -> JobInfo:
        """Every field of one job, with payload, result and error history decoded; JobNotFound if none."""
        return _job_info(queries.get(self._db(), job_id))

    def jobs(self, *, status: str | None = None, user: str | None = None, kind: str | None = None,
             limit: int = 50, cursor: int | None = None) -> JobPage:
        """Jobs, newest first, without payloads; page on with the returned cursor."""
        if not 1 <= limit <= 100_000:
            raise InputError(f"limit {limit}: expected 1 to 100000", where="limit")
        rows = queries.list_jobs(self._db(), status=status, user_id=user, kind=kind, limit=limit + 1, after=cursor)
        page = [_job_info(r) for r in rows[:limit]]
        return JobPage(page, page[-1].id if len(rows) > limit else None)

    def wait(self, job_ids: Iterable[int], timeout: float = 60.0) -> list[JobInfo]:
        """Return once every job is done, dead or cancelled, or when `timeout` seconds have passed: each job's
        state then, in the order given (check `.finished`). Sleeps between looks, waking early when another
        process commits to the database (no polling of the jobs table)."""
        given = list(job_ids)  # may repeat an id (two items under one idempotency key): answered for each
        ids = list(dict.fromkeys(given))
        db = self._db()
        deadline = time.monotonic() + timeout
        pause = WAIT_MIN_S
        while True:
            token = db.change_token()
            states = queries.statuses(db, ids)
            missing = [i for i in ids if i not in states]
            if missing:
                raise JobNotFound(missing[0])
            if all(s in FINISHED for s in states.values()) or time.monotonic() >= deadline:
                jobs = {i: self.job(i) for i in ids}
                return [jobs[i] for i in given]
            # Sleep until something commits (the token moves) or the pause is over; pauses grow while idle.
            while db.change_token() == token and time.monotonic() < deadline:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, WAIT_MAX_S)
            pause = WAIT_MIN_S

    def retry(self, job_id: int) -> list[int]:
        """Queue a dead, cancelled or scheduled job again now, with a full set of attempts."""
        from cardq import doorbell

        ids = admin.retry(self._db(), job_id)
        doorbell.ring(self._loaded.run_dir)
        return ids

    def retry_dead(self, *, user: str | None = None, kind: str | None = None) -> list[int]:
        """Queue every dead job again (narrowed by user and kind); the ids queued again."""
        from cardq import doorbell

        ids = admin.retry(self._db(), status="dead", user_id=user, kind=kind)
        if ids:
            doorbell.ring(self._loaded.run_dir)
        return ids

    def cancel(self, job_id: int) -> str:
        """Cancel a queued, scheduled or processing job; returns the status it had."""
        return admin.cancel(self._db(), job_id)

    def purge(self, older_than: str | float, *, statuses: Sequence[str] = ("done",), dry_run: bool = False) -> int:
        """Delete jobs that finished more than `older_than` ago ("7d", "12h" or seconds); how many (with
        dry_run: would be)."""
        seconds = app.parse_duration(older_than) if isinstance(older_than, str) else float(older_than)
        if not 0 <= seconds <= app.MAX_DURATION_S:
            raise InputError(f"older_than {older_than!r}: expected 0 to 100 years", where="older_than")
        return admin.purge(self._db(), older_than_s=seconds, statuses=tuple(statuses), dry_run=dry_run)

    # ---- limits -----------------------------------------------------------------------------------------------

    def limits(self) -> dict[str, Limit]:
        """Every limit: its value in effect and where it comes from (override, config or default)."""
        return store_limits.show(self._db(), self.config.limit_values())

    def set_limit(self, key: str, value: int | str) -> int:
        """Override a limit in the database (the next submit applies it); returns the value stored."""
        return store_limits.override(self._db(), self.config.limit_values(), key, value, now=time.time())

    def unset_limit(self, key: str) -> bool:
        """Back to the config.toml (or built-in) value; whether there was an override."""
        return store_limits.drop_override(self._db(), self.config.limit_values(), key)

    # ---- status -----------------------------------------------------------------------------------------------

    def status(self, *, top: int = 10) -> dict[str, Any]:
        """What `cardq status --json` prints: jobs by status, busiest users, today, limits, the supervisor and
        its workers, the config in effect, the gates."""
        from cardq.running import supervisor_summary  # the supervisor's modules load only when asked for

        loaded, db = self.config, self._db()
        data = queries.stats(db, loaded.limit_values(), top_users=top)
        data["processes"] = processes.read_all(db)
        data["config"] = {"file": loaded.source, "digest": loaded.digest, "error": self.config_error}
        data["supervisor"] = supervisor_summary(loaded, data["processes"])
        data["gates"] = self._gate_stats() if data["supervisor"]["running"] else None
        from cardq.checks import disk_warnings, loose_permissions

        data["warnings"] = disk_warnings(loaded) + loose_permissions(loaded)
        return data

    def throughput(self, *, minutes: int = 60) -> dict[str, Any]:
        """Jobs finished per minute over the last `minutes` (1 to 1440) whole minutes, the current one (partial)
        last: {"since": epoch seconds of the first minute's start, "minute_s": 60, "done": [n, ...], "dead":
        [...], "cancelled": [...]}, one number per minute. A minute is counted once it is SETTLED_S past its end
        and then kept (a later purge does not lower it), so a page asking every 2 s counts only the newest jobs."""
        if not 1 <= minutes <= 1440:
            raise InputError(f"minutes {minutes}: expected 1 to 1440", where="minutes")
        now = time.time()
        until = (int(now) // 60 + 1) * 60
        since = until - 60 * minutes
        settled_until = int(now - SETTLED_S) // 60 * 60  # the minutes before it are over, with their last commits
        with self._lock:
            kept = {m: row for m, row in self._finished_minutes.items() if since <= m < settled_until}
        first = since
        while first in kept:
            first += 60
        fresh = queries.finished_per_minute(self._db(), first, until)
        for i, minute in enumerate(range(first, settled_until, 60)):
            kept[minute] = tuple(fresh[status][i] for status in FINISHED)
        with self._lock:
            self._finished_minutes = kept
        out: dict[str, Any] = {"since": since, "minute_s": 60}
        for n, status in enumerate(FINISHED):
            out[status] = [kept[m][n] for m in range(since, first, 60)] + fresh[status]
        return out

    def readiness(self) -> dict[str, str | None]:
        """What /readyz checks: {"database", "actors", "children"} -> None when fine, else why not (one line).
        The database must take a write (its write lock, a disk with room, not read-only), every actor shard
        must answer a ping, and the supervisor must run with every permanent child up."""
        import shutil

        from cardq.errors import read_only_fs
        from cardq.reload import actor_shards
        from cardq.running import supervisor_summary

        loaded, out = self.config, {}
        try:
            db = self._db()
            db.write(lambda c: None, "readiness")
            if read_only_fs(loaded.db_path):
                out["database"] = f"{loaded.db_path}: read-only file system"
            elif shutil.disk_usage(loaded.db_path.parent).free < 1024 * 1024:
                out["database"] = f"{loaded.db_path}: disk full (less than 1 MiB free)"
            else:
                out["database"] = None
        except Error as e:
            out["database"] = str(e)
        try:
            client = self._client()
            for actor, shards in actor_shards(loaded).items():
                for shard in range(shards):
                    client.ask_shard(actor, shard, "ping", {}, timeout=1.0)
            out["actors"] = None
        except Error as e:
            out["actors"] = str(e)
        try:
            summary = supervisor_summary(loaded, processes.read_all(self._db()))
            down = [w["name"] for w in summary["workers"] if w["pid"] is None or w["state"] in ("restarting",
                                                                                                "stopped")]
            out["children"] = ("no supervisor runs" if not summary["running"] else
                               f"not up: {', '.join(down)}" if down else None)
        except Error as e:
            out["children"] = str(e)
        return out

    def metrics(self, *, actor_timeout_s: float = 0.5) -> MetricsSnapshot:
        """The figures /metrics exposes, from the processes that hold them: the store's durable totals (jobs by
        kind, durations, limit rejections — counted by whichever process moved each job) and counts, from one
        snapshot that scans no table of jobs; the supervisor's published process table (children's restarts, its
        reloads and config digest); and each actor shard's own figures since it started, asked over its socket
        (an actor that does not answer within actor_timeout_s is listed with its error, the rest still shown)."""
        from cardq.reload import actor_shards
        from cardq.running import supervisor_summary

        loaded, db = self.config, self._db()
        figures = totals.snapshot(db)
        rows = processes.read_all(db)
        running = supervisor_summary(loaded, rows)["running"]
        sup = next((r for r in rows if r["role"] == "supervisor"), None) if running else None
        children = [{k: r[k] for k in ("name", "role", "pid", "state", "restarts")} for r in rows
                    if running and r["role"] != "supervisor"]
        actors: list[dict[str, Any]] = []
        for actor, shards in actor_shards(loaded).items():
            for shard in range(shards):
                if not running:
                    actors.append({"actor": actor, "shard": shard, "error": "no supervisor runs"})
                    continue
                try:
                    actors.append(self._client().ask_shard(actor, shard, "stats", {}, timeout=actor_timeout_s))
                except Error as e:
                    actors.append({"actor": actor, "shard": shard, "error": str(e)})
        info = {**sup["info"], "pid": sup["pid"], "started_at": sup["started_at"]} if sup else None
        return MetricsSnapshot(figures, info, children, actors)

    def change_token(self) -> int:
        """A number that moves whenever any process commits to the database (for waiting without polling rows)."""
        return self._db().change_token()

    def _gate_stats(self) -> dict[str, Any] | str:
        """The running gates, or why they cannot be shown (status must work even when the actors do not)."""
        try:
            return self.gate_stats(timeout_s=0.5)
        except Error as e:
            return f"unavailable: {e}"

    def gate_stats(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Each gate: active, queued, dropped_since_boot, avg/p95 wait, last drop and its limits in effect."""
        return self.ratelimit.gate_stats(timeout_s=timeout_s)

    # ---- the supervisor ---------------------------------------------------------------------------------------

    def reload(self, *, wait_s: float = 10.0) -> dict[str, Any]:
        """Ask the running supervisor to re-read config.toml (SIGHUP) and wait (up to wait_s) for what became of
        it: {"pid", "applied": True/False/None (no answer in time), "config_version", "config_digest", "error"}."""
        from cardq.running import reload_and_wait

        return reload_and_wait(self._loaded, self._db(), wait_s)

    def stop(self, *, wait: bool = True) -> int:
        """Ask the running supervisor to stop after in-flight jobs (SIGTERM), by default waiting until it has."""
        from cardq.running import signal_supervisor

        pid = signal_supervisor(self._loaded, "SIGTERM")
        if wait:
            self.wait_stopped()
        return pid

    def wait_stopped(self) -> None:
        """Wait until no supervisor runs on this database (at most its shutdown_timeout_s and 30 s more)."""
        from cardq.running import wait_stopped

        wait_stopped(self._loaded, timeout=self._loaded.config.supervisor.shutdown_timeout_s + 30)

    # ---- HTTP API tokens ---------------------------------------------------------------------------------------

    def create_token(self, scope: str, name: str = "") -> NewToken:
        """A new bearer token for the HTTP API (`read`, `app` or `admin`); the token itself is in the answer
        only: the database keeps its SHA-256 digest."""
        from cardq import tokens

        return NewToken(*tokens.create(self._db(), scope, name))

    def tokens(self) -> list[TokenInfo]:
        from cardq.store import tokens as store_tokens

        return [TokenInfo(*row) for row in store_tokens.list_all(self._db())]

    def revoke_token(self, token_id: int) -> bool:
        """Whether a live token had this id. A running HTTP server stops taking it within a second."""
        from cardq.store import tokens as store_tokens

        return store_tokens.revoke(self._db(), token_id, now=time.time())

    def token_scope(self, token: str) -> tuple[int, str] | None:
        """(id, scope) of a live token, None for an unknown or revoked one."""
        from cardq import tokens

        return tokens.check(self._db(), token)

    # ---- traffic ----------------------------------------------------------------------------------------------

    def record_events(self, events: Sequence[Mapping[str, Any]]) -> EventsRecorded:
        """Record events now, all or none validated first (InputError naming the index and field), and return
        once they are committed by the path collector or stored in its durable inbox — unlike `events.record`,
        which buffers. The ids are idempotent: the same events sent again count once (give `ts_ms` and
        `request_id`, or `idempotent_id`, so that a resend has the same id)."""
        (recorded,) = self.record_events_many([events])
        if isinstance(recorded, InputError):
            raise recorded
        return recorded

    def record_events_many(self, batches: Sequence[Sequence[Mapping[str, Any]]]) -> list[EventsRecorded | InputError]:
        """record_events for several arrays at once (a server taking events from many clients): each validated on
        its own (its InputError in its place; the others are recorded), then all sent together — pipelined, one
        frame per collector shard, decided in one commit — and each answered with its own counts."""
        recorder = self.events
        out: list[EventsRecorded | InputError | None] = [None] * len(batches)
        built: list[tuple[int, list[dict[str, Any]]]] = []
        for n, events in enumerate(batches):
            try:
                built.append((n, recorder.build_all(events)))
            except InputError as e:
                out[n] = e
        if built:
            counts = recorder.send_now_many(self._client(), [b for _, b in built])
            for (n, b), c in zip(built, counts, strict=True):
                out[n] = EventsRecorded([e["id"] for e in b], **c)
        return out  # type: ignore[return-value]  (every place filled)

    def path_stats(self, *, hour: int | None = None, path: str | None = None, hours: int | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        """Hourly path statistics, hottest first: requests, 4xx/5xx, bytes, p50/p95/p99 ms, unique clients.
        `hour` (epoch seconds of an hour's start) narrows to one hour; `hours` to the last N hours."""
        from cardq.actors.paths import read_stats

        since = None
        if hours is not None:
            if not 1 <= hours <= 24 * 366:
                raise InputError(f"hours {hours}: expected 1 to 8784", where="hours")
            since = int(time.time() // 3600 * 3600) - (hours - 1) * 3600
        if not 1 <= limit <= 10_000:
            raise InputError(f"limit {limit}: expected 1 to 10000", where="limit")
        return read_stats(self._db(), hour=hour, path=path, since=since, limit=limit)

    # ---- actors -----------------------------------------------------------------------------------------------

    @contextmanager
    def gate(self, name: str, *, wait_s: float | None = None) -> Iterator[str]:
        """Hold a permit of concurrency gate `name` for the block: a free one is taken in this process (a kernel
        lock, microseconds; it works with no supervisor running); when none is free the caller waits in the
        gate's bounded queue at the RateLimiter actor (Overloaded when the queue is full or no permit came in
        time — the gate's queue_timeout_ms, or wait_s if shorter; ActorUnavailable when no supervisor runs)."""
        with self._client().gate(name, wait_s) as permit:
            yield permit

    @property
    def events(self) -> EventRecorder:
        """The buffered traffic-event recorder: `q.events.record(path=..., status=..., response_ms=...)` never
        blocks; events reach the path collector, or the durable inbox when it is down."""
        if self._closed:
            raise Error("this cardq Queue was closed; connect() again")
        if self._events is None or self._events_pid != os.getpid():  # after a fork the sender thread is gone
            with self._lock:
                if self._events is None or self._events_pid != os.getpid():
                    from cardq.actors.client import ActorClient
                    from cardq.actors.recorder import EventRecorder

                    loaded, name = self._loaded, self.name
                    self._events = EventRecorder(
                        loaded, lambda: ActorClient.from_config(loaded, name=f"{name}-events"), name=name)
                    self._events_pid = os.getpid()
        return self._events


class RateLimits:
    """`q.ratelimit`: GCRA rate limits per key, policies from [ratelimit]."""

    def __init__(self, q: Queue):
        self._q = q
        self.allowed_unavailable = 0  # checks allowed by on_unavailable="allow" (no limiter reachable)

    def check(self, key: str, cost: int = 1, *,
              on_unavailable: Literal["deny", "allow"] = "deny") -> RateLimitDecision:
        """Spend `cost` of the key's limit if allowed. When no rate limiter can be reached: "deny" raises
        ActorUnavailable (at once when no supervisor runs); "allow" lets the request through and counts it."""
        _check_mode(on_unavailable)
        try:
            r = self._q._client().ratelimit.check(key, cost)
        except ActorUnavailable as e:
            return self._unavailable(e, on_unavailable)
        return _decision(r)

    async def check_async(self, key: str, cost: int = 1, *,
                          on_unavailable: Literal["deny", "allow"] = "deny") -> RateLimitDecision:
        """check() for code on an asyncio event loop: no thread waits for the answer. The loop's tasks share one
        connection per rate-limiter shard, and the checks they make in one turn of the loop travel together and
        are decided in one commit."""
        _check_mode(on_unavailable)
        try:
            r = await self._q._loop_client().ask("ratelimit", key, "check", {"key": key, "cost": cost})
        except ActorUnavailable as e:
            return self._unavailable(e, on_unavailable)
        return _decision(r)

    def _unavailable(self, e: ActorUnavailable, on_unavailable: str) -> RateLimitDecision:
        """No rate limiter to ask: raise ("deny"), or let the request through and count it ("allow")."""
        if on_unavailable == "deny":
            raise e
        with self._q._lock:
            self.allowed_unavailable += 1
        return RateLimitDecision(True, 0, 0, 0.0, 0.0, unavailable=True)

    def check_many(self, keys: Sequence[str], cost: int = 1) -> list[RateLimitDecision]:
        """Many checks pipelined (every one sent before the first answer is read)."""
        return [_decision(r) for r in self._q._client().ratelimit.check_many(list(keys), cost)]

    def gate_stats(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        client = self._q._client()
        if timeout_s is None:
            return client.ratelimit.gate_stats()
        previous, client.timeout_s = client.timeout_s, timeout_s
        try:
            return client.ratelimit.gate_stats()
        finally:
            client.timeout_s = previous


class Counters:
    """`q.counter`: named counters, exactly once per op id (`usage:<user>` is a user's jobs done today)."""

    def __init__(self, q: Queue):
        self._q = q

    def get(self, key: str) -> int:
        return self._q._client().counter.get(key)

    def incr(self, key: str, n: int = 1, *, op_id: str | None = None) -> int:
        """Add n; the new value. Give an op_id to make a retry apply once (one is made if not given, so the
        client's own resends after a lost connection apply once)."""
        return self._q._client().counter.incr(key, n, op_id or uuid.uuid4().hex)

    def incr_if_below(self, key: str, n: int, limit: int, *, op_id: str | None = None) -> CounterResult:
        """Add n only if the counted total stays <= limit."""
        r = self._q._client().counter.incr_if_below(key, n, limit, op_id or uuid.uuid4().hex)
        return CounterResult(r["ok"], r["value"])


def connect(config: str | os.PathLike | None = None, *, name: str = "app", tolerate_invalid: bool = False) -> Queue:
    """Connect to the cardq deployment of a config file, like the CLI: `config`, else $CARDQ_CONFIG, else
    ./config.toml if present, else the built-in defaults.

    With tolerate_invalid (for read-only tools such as `cardq status`): an invalid file still names the database,
    and the Queue runs on the built-in defaults with `config_error` set.
    """
    path = config or os.environ.get("CARDQ_CONFIG") or None
    if tolerate_invalid:
        loaded, error = app.load_for_reading(path)
        return Queue(loaded, name=name, config_error=error)
    return Queue(app.load(path), name=name)


def read_items(file: str | os.PathLike, *, fmt: str = "auto",
               idempotency_key_field: str | None = None) -> list[inputs.Item]:
    """Read a batch from a JSONL file, a JSON array or a CSV with a header ("-": standard input); InputError
    naming the first bad line."""
    name = "<stdin>" if str(file) == "-" else str(file)
    from cardq import inputs

    return inputs.parse_items(inputs.read_text(str(file), name), name, fmt, idempotency_key_field)


def supervise(config: str | os.PathLike | LoadedConfig | None = None, *, workers: int | None = None,
              burst: bool = False, log_level: str | None = None,
              on_progress: Callable[[int], None] | None = None) -> None:
    """Run the supervisor, its workers and actors in this process until SIGTERM/SIGINT (or, with burst, until
    every job is finished). Raises RestartIntensityExceeded when children kept dying, ConfigError when they
    cannot run with this config, AlreadyRunning when another supervisor has the database."""
    from cardq import running

    loaded = config if isinstance(config, LoadedConfig) else app.load(config or os.environ.get("CARDQ_CONFIG"))
    if log_level is not None:
        loaded = running.with_log_level(loaded, log_level)
    running.supervise(loaded, workers=workers, burst=burst, on_progress=on_progress)


class Initialized(msgspec.Struct, frozen=True):
    config_path: Path
    config_written: bool  # False: a file was there already and was left as it is
    database: Path
    schema_version: int
    key_file: Path


def init(config: str | os.PathLike | None = None) -> Initialized:
    """Write a commented config.toml (unless one exists), create the database and the actors' key file."""
    from cardq.actors import keys

    target = Path(config) if config else Path("config.toml")
    written = not target.exists()
    if written:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(app.DEFAULT_CONFIG_TEXT())
    loaded = app.load(target)
    with app.open_db(loaded, create=True) as db:
        version = db.schema_version()
    return Initialized(target, written, loaded.db_path, version, keys.ensure_run_dir(loaded.run_dir))


def selftest(config: str | os.PathLike | None = None) -> list[Any]:
    """`cardq selftest`: each check (config, database, pragmas, schema, handler, disk, supervisor) with ok and
    its detail; never raises for a failing check."""
    from cardq import checks

    return checks.run(str(config) if config else os.environ.get("CARDQ_CONFIG"))


def _parsed_items(items: Iterable[Any], idempotency_key_field: str | None) -> list[inputs.Item]:
    """Items as submit takes them: already parsed (read_items), or JSON objects to check and key."""
    from cardq import inputs

    items = list(items)
    if items and all(isinstance(i, inputs.Item) for i in items):
        return items
    return inputs.items_from_objects(items, idempotency_key_field)


def _check_mode(on_unavailable: str) -> None:
    if on_unavailable not in ("deny", "allow"):
        raise InputError(f'on_unavailable {on_unavailable!r}: expected "deny" or "allow"', where="on_unavailable")


def _decision(r: Mapping[str, Any]) -> RateLimitDecision:
    return RateLimitDecision(r["allowed"], r["limit"], r["remaining"], r["retry_after_s"], r["reset_after_s"],
                             policy=r.get("policy", ""), window_s=r.get("window_s", 0.0))


def systemd_unit(config: str | os.PathLike | None = None, *, user: str | None = None,
                 argv0: str | None = None) -> str:
    """The text of a systemd service unit (Type=notify, watchdog, hardened) that runs `cardq supervise` for this
    config file: `config`, else $CARDQ_CONFIG, else ./config.toml (a file is needed: the unit names it). `user`:
    the account it runs as (default: root). `argv0`: the `cardq` executable running now, if it is one; else the
    one beside this Python, or on PATH, is named in ExecStart. ConfigError if there is no valid config file."""
    from cardq import systemd

    path = resolve_config_path(config or os.environ.get("CARDQ_CONFIG") or None)
    if path is None:
        raise ConfigError("no config file: a systemd unit runs one; pass --config PATH (or run `cardq init` first)")
    return systemd.render(app.load(os.path.abspath(path)), systemd.command(argv0), user=user)


def _job_info(row: Mapping[str, Any]) -> JobInfo:
    return JobInfo(**{k: row.get(k) for k in _JOB_FIELDS})


_JOB_FIELDS = JobInfo.__struct_fields__


def _close_in(pid: int, conn: Any) -> None:
    """A thread's connection, closed when its state is collected — but only in the process that opened it: a
    SQLite connection must never be touched across a fork."""
    if os.getpid() == pid:
        conn.close()


def _fresh(stamp: tuple[int, int, int] | None) -> bool:
    """Written within the last 2 s: a file's mtime moves in coarse ticks, so a second edit of the same size may
    keep its stamp; until the tick has surely passed, the content is compared too (a read of a small file)."""
    return stamp is not None and time.time() - stamp[2] / 1e9 < 2.0


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What says a file changed: (inode, size, mtime in ns). None when there is no file (or it vanished)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


__all__ = [
    "FINISHED", "FORMATS", "MAX_PRIORITY", "STATUSES", "Batch", "CounterResult", "EventsRecorded", "Initialized",
    "JobInfo", "JobPage", "Limit", "MetricsSnapshot", "NewToken", "Queue", "RateLimitDecision", "TokenInfo",
    "connect", "init", "read_items", "selftest", "supervise", "systemd_unit",
]
