"""The client every process uses to talk to the actors: workers, the CLI, and apps on the same VM.

    from cardq.actors.client import ActorClient
    with ActorClient.from_config(loaded) as cq:
        cq.ratelimit.check("user:42")             # {"allowed", "limit", "remaining", "retry_after_s", "reset_after_s"}
        with cq.gate("generation"):               # at most max_concurrency at once, across every process
            ...
        cq.counter.incr("cards:made", 1)          # exactly once, even if retried after a timeout
        cq.events.record(path="/cards/17", status=200, response_ms=12.5, client_ip="10.0.0.7", request_id="r1")

One ActorClient per thread: it holds one connection per actor shard and is not thread-safe. An ask never hangs: it
reconnects to a restarting actor and resends until its deadline, then raises ActorUnavailable (never
connected) or ActorTimeout (sent, no answer). Asks that change state carry an op id, so a resent one is
applied once.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cardq.actors import keys, protocol
from cardq.actors.gatelimit import AdaptiveLimit, outcome_of
from cardq.actors.gateslots import GateSlots
from cardq.actors.protocol import socket_path
from cardq.actors.recorder import EventRecorder
from cardq.config import GateConfig, LoadedConfig
from cardq.errors import ActorError, ActorTimeout, ActorUnavailable, Error, InvalidRequest, NotRunning, Overloaded
from cardq.lockfile import running_pid

RECONNECT_PAUSE_S = 0.02
UNRELEASED_MAX = 1000  # permits whose release failed, kept to be released later
WINDOW = 128  # most asks one client has unanswered on one connection
FRAME_BUDGET = 256 * 1024  # bytes of asks packed into one frame (well under the actors' max_frame_bytes)


class ActorClient:
    def __init__(self, run_dir: Path, *, shards: dict[str, int], timeout_s: float = 2.0, name: str = "",
                 loaded: LoadedConfig | None = None, unreleased: list[tuple[str, str]] | None = None):
        """`unreleased`: where gate permits whose release failed wait to be released at the next gate call; pass
        one list to several clients (one per thread) so that any of them releases them."""
        self.run_dir = run_dir
        self.shards = shards
        self.timeout_s = timeout_s
        self.name = name
        self.loaded = loaded
        self.db_path = loaded.db_path if loaded is not None else None
        try:
            self.secret = keys.load_secret(run_dir)
        except Error as e:  # no key file yet: no supervisor ever ran here, so no actor can be reached
            raise ActorUnavailable(str(e), "unavailable") from None
        self.authkey = keys.authkey(self.secret)
        self._links: dict[tuple[str, int], mpc.Connection] = {}
        self._next_id = 0
        self._events: Any = None
        self._unreleased = unreleased if unreleased is not None else []
        self._gate_slots: dict[str, GateSlots] = {}  # gate -> this client's handles on its slot files
        self._gate_limits: dict[str, AdaptiveLimit] = {}  # adaptive gate -> this client's handle on its limit
        self.resent = 0  # asks sent again after their connection broke (for tests and diagnostics)

    @classmethod
    def from_config(cls, loaded: LoadedConfig, name: str = "",
                    unreleased: list[tuple[str, str]] | None = None) -> ActorClient:
        a = loaded.config.actors
        shards = {"counter": a.counter_shards, "ratelimit": a.ratelimit_shards, "paths": a.paths_shards}
        return cls(loaded.run_dir, shards=shards, timeout_s=a.ask_timeout_ms / 1000, name=name, loaded=loaded,
                   unreleased=unreleased)

    def __enter__(self) -> ActorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        for conn in self._links.values():
            conn.close()
        self._links.clear()
        for slots in self._gate_slots.values():
            slots.close()  # (a permit still held in a `with` is given back with its descriptor)
        self._gate_slots.clear()
        for limit in self._gate_limits.values():
            limit.close()
        self._gate_limits.clear()

    # Made on each use rather than kept: an attribute pointing back at this client would make a reference cycle,
    # and a client dropped by its thread would then hold its sockets until the garbage collector runs.
    @property
    def counter(self) -> CounterAPI:
        return CounterAPI(self)

    @property
    def ratelimit(self) -> RateLimitAPI:
        return RateLimitAPI(self)

    @property
    def events(self) -> Any:
        """The buffered traffic-event recorder (actors.recorder.EventRecorder), created on first use."""
        if self._events is None:
            if self.loaded is None:
                raise ActorError("events need a client made with ActorClient.from_config")
            loaded, name = self.loaded, self.name
            self._events = EventRecorder(loaded, lambda: ActorClient.from_config(loaded, name=f"{name}-events"),
                                         name=name)
        return self._events

    # ---- asks and tells ------------------------------------------------------------------------------------

    def ask(self, actor: str, key: str, op: str, args: dict[str, Any], *, timeout: float | None = None) -> Any:
        """One request; its result, or the actor's error raised."""
        return self.ask_many(actor, [(key, op, args)], timeout=timeout)[0]

    def ask_many(self, actor: str, requests: list[tuple[str, str, dict[str, Any]]], *,
                 timeout: float | None = None, raise_errors: bool = True) -> list[Any]:
        """Send every request (pipelined), then collect every answer, in order. With raise_errors=False an
        actor's refusal comes back as an ActorError in its place instead of being raised."""
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        n_shards = self._shards(actor)
        pending: dict[int, tuple[int, int, bytes]] = {}  # msg id -> (position, shard, frame)
        for pos, (key, op, args) in enumerate(requests):
            self._next_id += 1
            pending[self._next_id] = (pos, protocol.shard_of(key, n_shards),
                                      _frame({"id": self._next_id, "op": op, "a": args}))
        results: list[Any] = [None] * len(requests)
        by_shard: dict[int, list[int]] = {}
        for msg_id, (_, shard, _) in pending.items():
            by_shard.setdefault(shard, []).append(msg_id)
        for shard, ids in by_shard.items():
            self._exchange(actor, shard, ids, pending, results, deadline)
        if raise_errors:
            for r in results:
                if isinstance(r, ActorError):
                    raise r
        return results

    def ask_shard(self, actor: str, shard: int, op: str, args: dict[str, Any], *,
                  timeout: float | None = None) -> Any:
        """An ask to one given shard (for questions every shard answers about itself)."""
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        self._next_id += 1
        pending = {self._next_id: (0, shard, _frame({"id": self._next_id, "op": op, "a": args}))}
        results: list[Any] = [None]
        self._exchange(actor, shard, [self._next_id], pending, results, deadline)
        if isinstance(results[0], ActorError):
            raise results[0]
        return results[0]

    def tell(self, actor: str, key: str, op: str, args: dict[str, Any]) -> None:
        """Fire and forget: sent if the actor can be reached within the ask timeout, no answer awaited."""
        shard = protocol.shard_of(key, self._shards(actor))
        deadline = time.monotonic() + self.timeout_s
        frame = _frame({"op": op, "a": args})
        while True:
            conn = self._link(actor, shard, deadline)
            try:
                conn.send_bytes(frame)
                return
            except (OSError, ValueError):
                self._forget(actor, shard)

    def _exchange(self, actor: str, shard: int, ids: list[int], pending: dict[int, tuple[int, int, bytes]],
                  results: list[Any], deadline: float) -> None:
        """Send `ids` with at most WINDOW unanswered at a time (reading answers while sending, so neither side's
        socket buffer can fill up and stall the other), until every one is answered."""
        waiting = set(ids)
        while waiting:
            conn = self._link(actor, shard, deadline)
            to_send = sorted(waiting)
            in_flight = 0
            try:
                while waiting:
                    if to_send and in_flight < WINDOW:
                        chunk, size = [], 0
                        while to_send and in_flight + len(chunk) < WINDOW and size < FRAME_BUDGET:
                            frame = pending[to_send.pop(0)][2]
                            chunk.append(frame)
                            size += len(frame)
                        # several asks travel as one frame: one write here, one read there
                        conn.send_bytes(protocol.combine(chunk))
                        in_flight += len(chunk)
                        if to_send and not conn.poll(0):
                            continue
                    left = deadline - time.monotonic()
                    if left <= 0 or not conn.poll(left):
                        raise ActorTimeout(f"{actor} shard {shard}: no answer within "
                                           f"{self.timeout_s:g}s ({len(waiting)} of {len(ids)} pending)", "timeout")
                    frame = protocol.decode(conn.recv_bytes())
                    for answer in frame.get("m", [frame]):
                        msg_id = answer.get("id")
                        if msg_id not in waiting:
                            continue  # a late answer to an ask that already timed out
                        waiting.discard(msg_id)
                        in_flight -= 1
                        results[pending[msg_id][0]] = _result(answer)
            except (EOFError, OSError, protocol.BadFrame):
                # The actor went away (crash, restart) mid-exchange: reconnect and send what is unanswered
                # again. State-changing asks carry op ids, so a resent one is applied once.
                self._forget(actor, shard)
                self.resent += len(waiting)
                if time.monotonic() >= deadline:
                    raise ActorTimeout(f"{actor} shard {shard}: connection lost, no answer within "
                                       f"{self.timeout_s:g}s", "timeout") from None

    def _shards(self, actor: str) -> int:
        n = self.shards.get(actor, 0)
        if n < 1:
            raise ActorUnavailable(f"actor {actor!r} is turned off ([actors] {actor}_shards = 0)", "unavailable")
        return n

    def _link(self, actor: str, shard: int, deadline: float) -> mpc.Connection:
        conn = self._links.get((actor, shard))
        if conn is None:
            conn = self._links[(actor, shard)] = self._connect(actor, shard, deadline)
        return conn

    def open_link(self, actor: str, shard: int, timeout_s: float) -> mpc.Connection:
        """A new connection to one shard, authenticated and introduced, that this client does not keep (for
        actors/aioclient.py, which hands it to its event loop); raises what an ask that cannot connect raises."""
        self._shards(actor)
        return self._connect(actor, shard, time.monotonic() + timeout_s)

    def _connect(self, actor: str, shard: int, deadline: float) -> mpc.Connection:
        path = socket_path(self.run_dir, actor, shard)
        while True:
            try:
                conn = mpc.Client(str(path), family="AF_UNIX", authkey=self.authkey)
                conn.send_bytes(protocol.encode({"pid": os.getpid(), "name": self.name}))
                return conn
            except mpc.AuthenticationError:
                raise ActorUnavailable(f"{path}: the actor refused our key (is {self.run_dir}/cardq.key the one "
                                       "its supervisor uses?)", "unavailable") from None
            except (OSError, EOFError) as e:
                if isinstance(e, FileNotFoundError | ConnectionRefusedError) and not self._supervisor_running():
                    # No socket (or one left by a killed supervisor) and no supervisor: nothing will come to
                    # listen, so say so now rather than after the whole ask timeout (an app's request path must
                    # not wait 2 s to learn it). A restarting actor is waited for: its supervisor still runs.
                    raise ActorUnavailable(f"{actor} shard {shard}: no actor listens at {path} and no supervisor "
                                           "runs on this database; start `cardq supervise`", "unavailable") from None
                if time.monotonic() + RECONNECT_PAUSE_S >= deadline:
                    raise ActorUnavailable(f"{actor} shard {shard} is not reachable at {path} "
                                           f"({type(e).__name__}); is `cardq supervise` running?",
                                           "unavailable") from None
                time.sleep(RECONNECT_PAUSE_S)

    def _supervisor_running(self) -> bool:
        """Is a supervisor (which starts and restarts the actors) holding this database? Unknown: assume so."""
        if self.db_path is None:
            return True
        try:
            running_pid(self.db_path)
        except NotRunning:
            return False
        return True

    def _forget(self, actor: str, shard: int) -> None:
        conn = self._links.pop((actor, shard), None)
        if conn is not None:
            conn.close()

    @contextmanager
    def gate(self, name: str, wait_s: float | None = None) -> Iterator[str]:
        """Hold a permit of gate `name` for the block: at most max_concurrency holders at once, across every
        process (an adaptive gate: at most its current limit, which the block's outcome moves — see
        actors/gatelimit.py). A free permit is taken in this process (a kernel lock, ~2 µs: actors/gateslots.py);
        when none is free, or others already wait, the caller waits in the actor's bounded queue (up to the gate's
        queue_timeout_ms) and Overloaded is raised at once when that queue is full. The holder is this process:
        if it dies, its permit comes back at once (a lock) or within a second (held for it by the actor)."""
        cfg = self.loaded.config.gates.get(name) if self.loaded is not None else None
        if self._unreleased:  # permits the actor holds for us that an earlier release could not give back
            with contextlib.suppress(ActorError):
                self.release_leftovers()
        if cfg is not None:  # a gate this client's config does not know: the actor answers for it
            slots = self._gate_slots.get(name)
            if slots is None:
                slots = self._gate_slots[name] = GateSlots(self.run_dir, name)
            if not slots.queue_waiting():
                slot = slots.try_take(self._gate_limit(name, cfg), files=cfg.max_concurrency)
                if slot is not None:
                    try:
                        with self._outcome(name, cfg):
                            yield f"{name}:{slot}"
                    finally:
                        slots.give(slot)
                    return
        with self._gate_queued(name, wait_s) as permit, self._outcome(name, cfg):
            yield permit

    def _adaptive(self, name: str, cfg: GateConfig | None) -> AdaptiveLimit | None:
        if cfg is None or not cfg.adaptive:
            return None
        limit = self._gate_limits.get(name)
        if limit is None:
            limit = self._gate_limits[name] = AdaptiveLimit.of_gate(self.run_dir, name)
        return limit

    def _gate_limit(self, name: str, cfg: GateConfig) -> int:
        """How many permits the gate allows now: max_concurrency, or an adaptive gate's current limit."""
        adaptive = self._adaptive(name, cfg)
        if adaptive is None:
            return cfg.max_concurrency
        try:
            return adaptive.current(cfg.min_concurrency, cfg.max_concurrency)
        except (OSError, ValueError):  # its state cannot be read (a full disk, the run directory unwritable; a
            return cfg.min_concurrency  # client closed by another thread): the safe end

    @contextmanager
    def _outcome(self, name: str, cfg: GateConfig | None) -> Iterator[None]:
        """An adaptive gate learns from each block run under its permit: how long it took, how it ended."""
        adaptive = self._adaptive(name, cfg)
        if adaptive is None:
            yield
            return
        started = time.monotonic()
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            try:
                change = adaptive.record(cfg.min_concurrency, cfg.max_concurrency, started, outcome_of(error),
                                         (time.monotonic() - started) * 1000)
            except (OSError, ValueError):  # (ValueError: the client was closed by another thread meanwhile)
                change = None  # learning nothing from this one is better than failing the caller's block
            if change is not None:
                from cardq import logs  # only when the limit moves: apps that never see a change skip structlog

                logs.get().info("gate.limit_changed", gate=name, old=change[0], new=change[1], why=change[2],
                                error=f"{type(error).__name__}: {error}"[:200] if error is not None else None)

    @contextmanager
    def _gate_queued(self, name: str, wait_s: float | None = None) -> Iterator[str]:
        """The slow path of `gate`: a permit from the actor's queue, held by the actor for this process. Waits
        up to the gate's queue_timeout_ms, or wait_s if that is shorter."""
        permit = uuid.uuid4().hex
        queue_s = 60.0
        if self.loaded is not None and name in self.loaded.config.gates:
            queue_s = self.loaded.config.gates[name].queue_timeout_ms / 1000
        if wait_s is not None:
            queue_s = min(queue_s, wait_s)
        self.release_leftovers()
        try:
            # The actor never keeps us waiting longer than we wait for its answer (wait_ms).
            self.ask("ratelimit", f"gate:{name}", "acquire",
                     {"gate": name, "permit": permit, "wait_ms": int(queue_s * 1000)},
                     timeout=queue_s + self.timeout_s)
        except (Overloaded, InvalidRequest):
            raise  # refused: nothing was queued, nothing was granted
        except BaseException:
            # We stopped waiting — a timeout, our own caller's deadline or ^C, a connection lost after the grant
            # was committed: take the request out of the queue, or give back the permit that came too late.
            # Otherwise the actor would hold it for this (live) process until it exits.
            try:
                self.ask("ratelimit", f"gate:{name}", "release", {"gate": name, "permit": permit})
            except ActorError:
                self._remember_unreleased(name, permit)  # released on our next gate call
            raise
        try:
            yield permit
        finally:
            try:
                self.ask("ratelimit", f"gate:{name}", "release", {"gate": name, "permit": permit})
            except ActorError:
                # Unreachable for the whole ask timeout: released on our next gate call (a dead holder's
                # permits are released by the actor itself).
                self._remember_unreleased(name, permit)

    def _remember_unreleased(self, name: str, permit: str) -> None:
        # Bounded: with no supervisor at all, every failed call adds one (the actor, were it to come back, reaps
        # a permit whose holder has exited; one of a live holder past this bound stays until that exit).
        if len(self._unreleased) < UNRELEASED_MAX:
            self._unreleased.append((name, permit))

    def release_leftovers(self) -> None:
        """Release the permits whose release failed earlier (a release of one already released is harmless)."""
        while self._unreleased:
            try:
                name, permit = self._unreleased[0]
            except IndexError:  # another thread's client took the last one
                return
            self.ask("ratelimit", f"gate:{name}", "release", {"gate": name, "permit": permit})
            with contextlib.suppress(ValueError):
                self._unreleased.remove((name, permit))


def _frame(msg: dict[str, Any]) -> bytes:
    try:
        return protocol.encode(msg)
    except TypeError as e:  # orjson: not JSON (an object, an integer beyond 64 bits, ...)
        raise InvalidRequest(f"{msg.get('op')}: arguments cannot be sent: {e}", "bad_request") from None


def _result(answer: dict[str, Any]) -> Any:
    if answer.get("ok"):
        return answer.get("r")
    code = str(answer.get("code", "error"))
    cls = {"overloaded": Overloaded, "timeout": ActorTimeout, "bad_request": InvalidRequest,
           "unavailable": ActorUnavailable}.get(code, ActorError)
    return cls(str(answer.get("err", "the actor refused the request")), code)


class CounterAPI:
    def __init__(self, client: ActorClient):
        self._c = client

    def incr(self, key: str, n: int = 1, op_id: str | None = None) -> int:
        """Add n; the new value. Retried with the same op_id (made here if not given), applied once."""
        return self._c.ask("counter", key, "incr", {"key": key, "n": n, "op_id": op_id or uuid.uuid4().hex})

    def get(self, key: str) -> int:
        return self._c.ask("counter", key, "get", {"key": key})

    def incr_if_below(self, key: str, n: int, limit: int, op_id: str | None = None) -> dict[str, Any]:
        """Add n only if the result stays <= limit: {"ok": bool, "value": int}."""
        return self._c.ask("counter", key, "incr_if_below",
                           {"key": key, "n": n, "limit": limit, "op_id": op_id or uuid.uuid4().hex})


class RateLimitAPI:
    def __init__(self, client: ActorClient):
        self._c = client

    def check(self, key: str, cost: int = 1) -> dict[str, Any]:
        return self._c.ask("ratelimit", key, "check", {"key": key, "cost": cost})

    def check_many(self, keys_: list[str], cost: int = 1) -> list[dict[str, Any]]:
        """Pipelined: every check sent before the first answer is read."""
        return self._c.ask_many("ratelimit", [(k, "check", {"key": k, "cost": cost}) for k in keys_])

    def gate_stats(self) -> dict[str, Any]:
        """Every gate's figures and limits in effect, from every shard."""
        out: dict[str, Any] = {}
        for shard in range(self._c._shards("ratelimit")):
            out.update(self._c.ask_shard("ratelimit", shard, "gate_stats", {}))
        return out
