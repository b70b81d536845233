"""Recording traffic events from an app's request path: buffered, never blocking, never lost.

record() validates the event, computes its idempotent id and the keyed hash of the client IP, and puts it on an
in-memory queue; a background thread sends batches (max_batch_size, at least every max_batch_wait_ms) to the
PathCollector shard that owns each path and waits for the answer, which comes after the commit. A batch the
collector cannot take (not running, restarting, timed out) is written to the durable traffic_inbox table, which
the collector drains when it is back; a batch sent twice counts once (idempotent ids). Only if the in-memory queue
itself is full does record() write to the inbox directly.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec
import orjson

from cardq import app
from cardq.actors import keys, protocol
from cardq.actors.traffic import PathNormalizer, make_event, make_event_dicts
from cardq.config import LoadedConfig
from cardq.errors import ActorError, Error, InputError
from cardq.store import traffic

QUEUE_MAX = 100_000


class Asker(Protocol):
    """What the recorder needs of an actor client (actors.client.ActorClient)."""

    def ask(self, actor: str, key: str, op: str, args: dict[str, Any]) -> Any: ...

    def close(self) -> None: ...


class EventRecorder:
    def __init__(self, loaded: LoadedConfig, connect: Callable[[], Asker], name: str = ""):
        """`connect()` makes the sender thread's own actor client (a client is not shared between threads)."""
        self.loaded = loaded
        cfg = loaded.config.paths
        self.enabled = cfg.enabled and loaded.config.actors.paths_shards > 0
        self.shards = max(1, loaded.config.actors.paths_shards)
        self.max_batch, self.max_wait_s = cfg.max_batch_size, cfg.max_batch_wait_ms / 1000
        # Request paths and client IPs repeat: remember recent answers (bounded) instead of recomputing them.
        self.normalize = functools.lru_cache(maxsize=65_536)(PathNormalizer(cfg.id_rules))
        # The key hashes client IPs, so events can be kept (in the inbox) before any supervisor ran: make it if
        # it is not there yet, as `cardq init` and `cardq supervise` would.
        try:
            keys.ensure_run_dir(loaded.run_dir)
        except OSError as e:
            raise Error(f"{loaded.run_dir}: cannot create the run directory or its key file: {e.strerror}") from None
        self.hash_ip = functools.lru_cache(maxsize=65_536)(keys.ip_hasher(keys.load_secret(loaded.run_dir)))
        self.name = name
        self._connect = connect
        # record() appends, the sender thread pops: deque's append and popleft are atomic, so the request path
        # takes no lock at all (a queue.Queue costs a lock and a condition per event).
        self.buffer: deque[dict[str, Any]] = deque()
        self.wakeup = threading.Event()
        self.sent = self.to_inbox = self.lost = 0
        self._in_flight = 0  # taken from the buffer by the sender, not yet answered or stored
        self._settled = threading.Condition()  # notified after each batch, for flush()
        self._closing = False
        self._db_lock = threading.Lock()
        self._db = None
        self._thread = threading.Thread(target=self._run, name="cardq-events", daemon=True)
        self._thread.start()

    def record(self, **fields: Any) -> str:
        """Queue one event; returns its idempotent id. Raises InputError for an event that cannot be one."""
        event = msgspec.structs.asdict(make_event(normalize=self.normalize, hash_ip=self.hash_ip, **fields))
        if not self.enabled:
            return event["id"]
        if len(self.buffer) >= QUEUE_MAX:  # the collector and the inbox are both far behind: store it now
            self._store([event])
            return event["id"]
        self.buffer.append(event)
        if not self.wakeup.is_set():
            self.wakeup.set()
        return event["id"]

    def build_all(self, fields: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Every event validated and given its id, or InputError naming the first bad one's index (then none is
        recorded): the all-or-nothing half of Queue.record_events."""
        made = make_event_dicts(fields, normalize=self.normalize, hash_ip=self.hash_ip)  # all valid: at once
        if made is not None:
            return made
        out = []
        for n, f in enumerate(fields):
            if not isinstance(f, Mapping):
                raise InputError(f"events[{n}]: expected an object, got {type(f).__name__}", where=f"events[{n}]")
            try:
                event = make_event(normalize=self.normalize, hash_ip=self.hash_ip, **f)
            except InputError as e:
                raise InputError(f"events[{n}]: {e}", where=f"events[{n}].{e.where}") from None
            except TypeError as e:  # an unknown or missing field name
                raise InputError(f"events[{n}]: {_field_problem(e)}", where=f"events[{n}]") from None
            out.append(msgspec.structs.asdict(event))
        return out

    def send_now_many(self, client: Any, batches: list[list[dict[str, Any]]]) -> list[dict[str, int]]:
        """Send batches to the collector shards and wait for their commit: their asks pipelined (one frame per
        shard, decided in one commit), each batch answered with its own counts; what a shard cannot take goes to
        the durable inbox. Raises (StoreError) only if the inbox cannot take them either: nothing is lost
        silently."""
        counts = [{"accepted": 0, "duplicates": 0, "late": 0, "sampled_out": 0, "to_inbox": 0} for _ in batches]
        if not self.enabled or not batches:
            return counts
        asks: list[tuple[str, str, dict[str, Any]]] = []
        owners: list[tuple[int, list[dict[str, Any]]]] = []  # per ask: its batch, its events
        for n, events in enumerate(batches):
            for shard_events in self._by_shard(events):
                asks.append((shard_events[0]["path"], "record", {"events": shard_events}))
                owners.append((n, shard_events))
        try:
            answers: list[Any] = client.ask_many("paths", asks, raise_errors=False)
        except ActorError as e:  # a shard not reachable, or no answer in time: all of it to the inbox
            answers = [e] * len(asks)
        for (n, shard_events), answer in zip(owners, answers, strict=True):
            if isinstance(answer, ActorError):
                self._inbox(shard_events)
                counts[n]["to_inbox"] += len(shard_events)
                continue
            for k in ("accepted", "duplicates", "late", "sampled_out"):
                counts[n][k] += int(answer.get(k, 0))
        return counts

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every recorded event was taken by the collector or written to the inbox."""
        self.wakeup.set()
        with self._settled:
            return self._settled.wait_for(lambda: not self.buffer and self._in_flight == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._closing = True
        self.wakeup.set()
        self._thread.join(timeout)
        if not self._thread.is_alive() and self._db is not None:
            self._db.close()

    def _run(self) -> None:
        client = self._connect()
        buffer = self.buffer
        while True:
            if not buffer:
                if self._closing:
                    client.close()
                    return
                self.wakeup.wait()  # (record, flush and close set it: an idle app's thread sleeps)
                self.wakeup.clear()
                continue
            # Give a batch up to max_batch_wait_ms to fill, then send what there is.
            deadline = time.monotonic() + self.max_wait_s
            while len(buffer) < self.max_batch and time.monotonic() < deadline and not self._closing:
                time.sleep(0.001)
            batch = []
            while buffer and len(batch) < self.max_batch:
                batch.append(buffer.popleft())
            self._in_flight = len(batch)
            self._send(client, batch)
            with self._settled:
                self._in_flight = 0
                self._settled.notify_all()

    def _send(self, client: Asker, batch: list[dict[str, Any]]) -> None:
        """To the collector, else to the inbox. Never raises: a dead thread would drop every later event."""
        for shard_events in self._by_shard(batch):
            try:
                client.ask("paths", shard_events[0]["path"], "record", {"events": shard_events})
                self.sent += len(shard_events)
            except ActorError:
                self._store(shard_events)
            except Exception as e:
                self._lose(shard_events, e)

    def _by_shard(self, events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The events split by the collector shard that owns each one's path."""
        by_shard: dict[int, list[dict[str, Any]]] = {}
        for event in events:
            by_shard.setdefault(protocol.shard_of(event["path"], self.shards), []).append(event)
        return list(by_shard.values())

    def _store(self, events: list[dict[str, Any]]) -> None:
        """The durable fallback: the inbox table, drained by the collector when it is back."""
        try:
            self._inbox(events)
        except Exception as e:  # the database failed too (disk full, locked for good): say so, loudly
            self._lose(events, e)

    def _lose(self, events: list[dict[str, Any]], error: Exception) -> None:
        self.lost += len(events)
        from cardq import logs  # here, not at the top: structlog is a heavy import for an app's start-up

        logs.get().error("events.lost", events=len(events), error=f"{type(error).__name__}: {error}"[:300])

    def _inbox(self, events: list[dict[str, Any]]) -> None:
        with self._db_lock:
            if self._db is None:
                self._db = app.open_db(self.loaded)
            traffic.inbox_add(self._db, [(protocol.shard_of(e["path"], self.shards), orjson.dumps(e).decode())
                                         for e in events])
        self.to_inbox += len(events)


def _field_problem(e: TypeError) -> str:
    """make_event's TypeError ("got an unexpected keyword argument 'x'") as a reader would say it."""
    text = str(e)
    if "unexpected keyword argument" in text:
        name = text.rsplit(" ", 1)[-1].strip("'")
        return (f"unknown field {name!r}; expected path, status, response_ms, method, client_ip, request_id, "
                "ts_ms, bytes, idempotent_id")
    if "missing" in text:
        return f"missing {text.split('argument', 1)[-1].strip(': ')}; expected at least path, status, response_ms"
    return text
