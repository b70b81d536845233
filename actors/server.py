"""The actor process: one shard of one actor, a serial mailbox on its own Unix socket.

Loop: wait for any client connection (or a new one, or a deadline); read every frame that is ready into one
batch; apply the batch in ONE SQLite transaction (each message under its own savepoint); commit; only then send
the answers — an actor never answers for a state change that is not committed (the Durable Object output gate),
and one commit serves many messages (group commit).

Robustness:
- connections are accepted and authenticated (multiprocessing.connection's HMAC challenge, both ways) on a
  short-lived thread with socket timeouts, so a client that connects and says nothing delays no one;
- a wrong key, a frame that is not a JSON object, or one over max_frame_bytes closes that connection and is
  logged; everyone else keeps being served;
- a message that fails its handler (an exception) is rolled back alone; one that fails 3 times — or whose
  handling killed the actor process 3 times, as the supervisor records from the actor's shared-memory slot — is
  moved to actor_dead_letters and answered with an error instead of crash-looping the actor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from typing import Any

import msgspec

from cardq import app, logs
from cardq.actors import keys, protocol
from cardq.actors.protocol import socket_path
from cardq.actors.telemetry import ASK_BOUNDS, Telemetry
from cardq.children import EXIT_STOPPED, EXIT_STORE, ChildContext
from cardq.config import LoadedConfig, parse_config
from cardq.errors import Error, InputError, StoreError
from cardq.store import dead_letters
from cardq.store.db import Tx

MAX_FAILURES = 3
HANDSHAKE_TIMEOUT_S = 2.0  # in all, not per read: a client that trickles its handshake is cut off at 2 s
SEND_TIMEOUT_S = 1.0  # the handshake's own writes
SOCKET_CHECK_S = 5.0  # how often an actor checks that its socket file is still there (and, with nothing to do,
# how often it wakes: each wake-up of an idle process costs ~0.5 ms of CPU on these VMs)
MAX_UNREAD = 4 * 1024 * 1024  # bytes of answers a client may leave unread before it is disconnected
RECV_CHUNK = 256 * 1024  # bytes read from one connection per loop turn: no client can starve the rest, and what
# one loop turn holds in memory stays bounded however fast clients send
MAX_PER_FRAME = 1024
DEFER = object()  # a handler's answer that will come later (a gate waiter)
SINGLE = "single"  # ops flag: the handler writes at most one statement, as its last step (no savepoint needed)
COMMON_OPS = {"ping": (None, "ping", SINGLE), "stats": (None, "stats", SINGLE)}  # ops every actor answers


@dataclass(eq=False)
class Peer:
    """A connected client process, as the actor sees it (the app side's object is actors.client.ActorClient)."""

    conn: Connection  # for sending (blocking, with a send timeout), and for wait()
    pid: int  # the peer's real pid (SO_PEERCRED)
    name: str
    sock: socket.socket | None = None  # a duplicate of the connection's socket, for non-blocking reads and
    # writes; made once, when the peer is registered (see ActorServer._register)
    buf: bytearray = field(default_factory=bytearray)  # bytes received, not yet a whole frame
    last_active: float = field(default_factory=time.monotonic)  # when it last sent something
    out: bytearray = field(default_factory=bytearray)  # answers framed, not yet taken by the client's socket

    def queue(self, frame: bytes) -> None:
        """Frame an answer as multiprocessing.connection does (a big-endian length first) for `flush`."""
        n = len(frame)
        self.out += struct.pack("!i", n) if n < 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self.out += frame

    def flush(self) -> bool:
        """Write what the socket takes now, never waiting (a client that does not read must cost the actor
        nothing); False if the connection is gone."""
        while self.out:
            try:
                sent = self.sock.send(self.out, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del self.out[:sent]
        return True


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def fd_limit() -> int:
    """This process's descriptor limit, raised first from the soft limit to the hard one (the usual soft limit,
    1024, is what a busy actor runs into)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Behaviour:
    """What an actor does. Subclasses define `ops` = {op: (msgspec Struct of arguments or None, method)}; a
    method runs inside the batch's transaction as method(tx, peer, args, msg_id), where tx is the store's handle
    on that transaction (pass it to store operations) and returns the answer (or
    DEFER). State kept in memory must be rebuilt from SQLite in __init__: after a crash the process starts anew."""

    name = "actor"
    ops: dict[str, tuple] = {}  # op -> (arguments Struct or None, method name[, SINGLE])

    def __init__(self, loaded: LoadedConfig, db: Any, shard: int):
        self.loaded, self.db, self.shard = loaded, db, shard
        self.log = logs.get(actor=self.name, shard=shard)
        self.telemetry = Telemetry()  # this process's figures for /metrics (the server counts into it too)
        self.started_at = time.time()

    def ping(self, tx: Tx, peer: Peer, a: Any, msg_id: int | None) -> dict[str, Any]:
        """Every actor's "ping" op: proof that it answers (readiness checks)."""
        return {"actor": self.name, "shard": self.shard}

    def stats(self, tx: Tx, peer: Peer, a: Any, msg_id: int | None) -> dict[str, Any]:
        """Every actor's "stats" op: its figures since this process started (actors/telemetry.py) — messages by
        op, each ask's time in the actor, and the behaviour's own counts — for /metrics."""
        return {"actor": self.name, "shard": self.shard, "pid": os.getpid(), "started_at": self.started_at,
                **self.telemetry.to_dict(), **self.more_stats()}

    def more_stats(self) -> dict[str, Any]:
        """A behaviour's figures that are state rather than counts (the gates' active and queued), for `stats`."""
        return {}

    def tick(self, tx: Tx, now: float) -> list[tuple[Peer, int, dict[str, Any]]]:
        """Periodic work inside a write transaction; returns deferred answers now due."""
        return []

    def next_tick(self, now: float) -> float:
        """When tick() next wants to run (epoch seconds)."""
        return now + 1.0

    def on_disconnect(self, client: Peer) -> None:
        pass

    def drain_answers(self) -> list[tuple[Peer, int, dict[str, Any]]]:
        """Answers to earlier (deferred) asks that this batch made due; sent after the commit."""
        return []

    def before_commit(self, tx: Tx) -> None:
        """Last writes of the batch's transaction (state folded in memory by several messages, written once)."""

    def on_tick_failed(self) -> None:
        """The periodic work failed and its transaction was rolled back: rebuild memory from SQLite."""

    def on_rollback(self) -> None:
        """A message's changes were rolled back: drop whatever in-memory state it may have touched."""

    def on_store_failed(self) -> list[tuple[Peer, int]]:
        """A whole transaction (a batch or a tick) failed to commit: rebuild memory from SQLite. Returns the
        deferred asks dropped with it (they are answered "unavailable")."""
        self.on_tick_failed()
        return []

    def apply_config(self, loaded: LoadedConfig) -> None:
        """A reloaded config (SIGHUP), already validated by the supervisor."""
        self.loaded = loaded


class ActorServer:
    def __init__(self, ctx: ChildContext, behaviour_cls: type[Behaviour]):
        self.ctx = ctx
        self.loaded = ctx.loaded
        self.actor, self.shard = ctx.spec.args["actor"], ctx.spec.args["shard"]
        self.run_dir = self.loaded.run_dir
        self.path = socket_path(self.run_dir, self.actor, self.shard)
        self.authkey = keys.authkey(keys.load_secret(self.run_dir))
        self.max_frame = self.loaded.config.actors.max_frame_bytes
        # Each connection costs two descriptors here (the connection and the duplicate read without blocking).
        self.max_connections = min(self.loaded.config.actors.max_connections, max(8, (fd_limit() - 64) // 2))
        self.refused = self.evicted = 0
        self.refused_logged_at = self.evicted_logged_at = 0.0
        self.store_failing_since: float | None = None  # monotonic: since when the database refuses our batches
        self.store_failures = 0
        self.listen_paused_until = 0.0
        self.db = app.open_db(self.loaded, autocheckpoint=False)
        self.behaviour = behaviour_cls(self.loaded, self.db, self.shard)
        self.ops = {**COMMON_OPS, **self.behaviour.ops}  # merged once: one lookup per message
        self.clients: dict[Connection, Peer] = {}
        self.new_clients: queue.SimpleQueue[Peer] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        self.log = logs.get(actor=self.actor, shard=self.shard)
        self.failures = dead_letters.failure_counts(self.db, self.actor)

    # ---- sockets --------------------------------------------------------------------------------------------

    def listen(self) -> socket.socket:
        # Bind a fresh name, then rename it over the path: the socket file never disappears while an actor
        # restarts (a client that finds no file at all concludes nothing runs and gives up at once), and a dead
        # predecessor's file is simply replaced.
        fresh = self.path.with_name(f".{os.getpid()}")  # shorter than the final name: a path that fits, fits
        fresh.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window in which another user could connect
        try:
            sock.bind(str(fresh))
        finally:
            os.umask(old)
        sock.listen(256)
        os.replace(fresh, self.path)
        sock.setblocking(False)
        return sock

    def accept(self, listener: socket.socket) -> None:
        """Take every waiting connection. At max_connections — or when the process is out of descriptors — the
        connection idle the longest is closed to make room (its client reconnects on its next ask): an app that
        leaks connections costs its own idle ones, not the actor or anyone else's."""
        while True:
            if len(self.clients) >= self.max_connections:
                self._evict_idlest("max_connections")
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self._refused(e)
                if not self._evict_idlest("file descriptors"):
                    self.listen_paused_until = time.monotonic() + 0.05  # nothing to close: do not spin on it
                    return
                continue
            threading.Thread(target=self._handshake, args=(sock,), daemon=True, name="handshake").start()

    def _evict_idlest(self, why: str) -> bool:
        if not self.clients:
            return False
        peer = min(self.clients.values(), key=lambda p: p.last_active)
        self.evicted += 1
        self.ctx.slot.connections(self.refused, self.evicted)  # for `cardq status`
        self._drop(peer)
        now = time.monotonic()
        if now >= self.evicted_logged_at + 1.0:  # at most once a second, with the count so far
            self.evicted_logged_at = now
            self.log.warning("gateway.evicting_idle_connections", reason=why, evicted_since_boot=self.evicted,
                             connections=len(self.clients), max_connections=self.max_connections)
        return True

    def _refused(self, e: OSError) -> None:
        """Out of descriptors: counted (`cardq status` shows it), and logged at most once a second."""
        self.refused += 1
        self.ctx.slot.connections(self.refused, self.evicted)
        now = time.monotonic()
        if now >= self.refused_logged_at + 1.0:
            self.refused_logged_at = now
            self.log.warning("gateway.out_of_descriptors", reason=e.strerror, refused_since_boot=self.refused,
                             connections=len(self.clients), closing="the connection idle the longest")

    def _handshake(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        timeval = struct.pack("ll", int(HANDSHAKE_TIMEOUT_S), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT_S), 0))
        # The peer's real pid, from the kernel (SO_PEERCRED): a client cannot claim to be another process.
        peer_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        # The whole handshake has a deadline: a watchdog shuts the socket down, and the read in progress ends.
        watchdog = threading.Timer(HANDSHAKE_TIMEOUT_S, _shutdown, args=(sock,))
        watchdog.start()
        conn = Connection(os.dup(sock.fileno()))
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            hello = protocol.decode(conn.recv_bytes(4096))
        except Exception as e:  # wrong key, garbage, silence: refuse this one connection, serve everyone else
            self.log.warning("gateway.refused", reason=f"{type(e).__name__}: {e}"[:200])
            conn.close()
            return
        finally:
            watchdog.cancel()
            sock.close()  # the connection has its own descriptor
        self.new_clients.put(Peer(conn, peer_pid, str(hello.get("name", ""))[:64]))
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self) -> int:
        listener = self.listen()
        self.log.info("actor.started", socket=str(self.path))
        next_tick, next_check = 0.0, time.monotonic() + SOCKET_CHECK_S  # both monotonic
        try:
            while not self.ctx.stopping:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + SOCKET_CHECK_S
                    listener = self._still_listening(listener)
                timeout = max(0.0, min(next_tick - time.monotonic(), SOCKET_CHECK_S))
                if self._flush_pending():  # a slow reader's answers: try again soon, without waiting on it
                    timeout = min(timeout, 0.01)
                listening = [listener] if time.monotonic() >= self.listen_paused_until else []
                ready = wait([*listening, self.wake_r, self.ctx.channel.conn, *self.clients], timeout)
                read_at = time.perf_counter()
                batch: list[tuple[Peer, dict[str, Any]]] = []
                for r in ready:
                    if r is listener:
                        self.accept(listener)
                    elif r == self.wake_r:
                        os.read(self.wake_r, 4096)
                    elif r is self.ctx.channel.conn:
                        self._commands()
                    elif r in self.clients:  # (not if an eviction in this round closed it)
                        self._read(self.clients[r], batch)
                while not self.new_clients.empty():
                    self._register(self.new_clients.get())
                # Ticks are scheduled on the monotonic clock: a step of the wall clock (NTP, a VM resume) must
                # neither stop them for a day nor fire them all at once. (Behaviours speak wall time.)
                mono = time.monotonic()
                due = mono >= next_tick
                if batch or due:
                    self.process(batch, tick=due)
                    if batch:  # each ask's time here: from its batch being read to the answers sent
                        self.behaviour.telemetry.observe_now(("ask_seconds",), ASK_BOUNDS,
                                                             time.perf_counter() - read_at, len(batch))
                    # a message may have set an earlier deadline (a gate waiter's): never sleep past it
                    wall = time.time()
                    upcoming = mono + (self.behaviour.next_tick(wall) - wall)
                    next_tick = upcoming if due else min(next_tick, upcoming)
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)
            for client in list(self.clients.values()):
                self._drop(client)
            self.db.close()
        return EXIT_STOPPED

    def _still_listening(self, listener: socket.socket) -> socket.socket:
        """The socket file gone (its run_dir deleted under us)? Listen anew at the path, once the supervisor has
        put the folder back: clients find the file again, and this process never dies of it."""
        if self.path.exists() or not self.path.parent.is_dir():
            return listener
        try:
            fresh = self.listen()
        except OSError as e:
            self.log.warning("actor.relisten_failed", socket=str(self.path), reason=e.strerror)
            return listener
        listener.close()
        self.log.warning("actor.socket_restored", socket=str(self.path))
        return fresh

    def _commands(self) -> None:
        while self.ctx.channel.poll(0):
            msg = self.ctx.channel.recv()
            if msg is None or msg.get("cmd") == "stop":
                self.ctx.stop_requested[0] = True
                return
            if msg.get("cmd") == "config":
                config = parse_config(msg["text"].encode(), msg.get("path") or "config.toml")
                if config.log.level != self.loaded.config.log.level:
                    logs.set_level(config.log.level)
                self.loaded = LoadedConfig(config, self.loaded.path, msg["digest"], self.loaded.explicit)
                self.behaviour.apply_config(self.loaded)
                self.log.info("actor.config_applied", digest=msg["digest"])

    def _register(self, peer: Peer) -> None:
        """A peer whose handshake passed joins the served ones, with the duplicate socket its reads and writes
        use. Out of descriptors for it: the idlest peer makes room, else this one is refused."""
        for _ in range(2):
            try:
                peer.sock = socket.fromfd(peer.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
                self.clients[peer.conn] = peer
                return
            except OSError as e:
                self._refused(e)
                if not self._evict_idlest("file descriptors"):
                    break
        peer.conn.close()

    def _read(self, client: Peer, batch: list[tuple[Peer, dict[str, Any]]]) -> None:
        """Take what the client has sent, without ever waiting for the rest of a frame (a client that trickles
        bytes costs nothing), and append every complete message to the batch."""
        try:
            chunk = client.sock.recv(RECV_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not chunk:
            self._drop(client)
            return
        client.last_active = time.monotonic()
        buf = client.buf
        buf += chunk
        while len(buf) >= 4:
            # multiprocessing.connection framing: a big-endian int32 length (-1: an uint64 length follows)
            size, header = struct.unpack("!i", buf[:4])[0], 4
            if size == -1:
                if len(buf) < 12:
                    return
                size, header = struct.unpack("!Q", buf[4:12])[0], 12
            if not 0 <= size <= self.max_frame:
                self.log.warning("gateway.refused", pid=client.pid,
                                 reason=f"frame of {size} bytes (max_frame_bytes={self.max_frame})")
                self._drop(client)
                return
            if len(buf) < header + size:
                return
            data = bytes(buf[header:header + size])
            del buf[:header + size]
            try:
                frame = protocol.decode(data)
                msgs = frame.get("m", [frame])  # a pipelined window travels as one frame
                if not isinstance(msgs, list) or len(msgs) > MAX_PER_FRAME:
                    raise protocol.BadFrame(f'"m" must be a list of at most {MAX_PER_FRAME} messages')
                for msg in msgs:
                    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str) \
                            or not isinstance(msg.get("a", {}), dict):
                        raise protocol.BadFrame('expected {"op": name, "a": {...}}')
            except protocol.BadFrame as e:
                self.log.warning("gateway.refused", pid=client.pid, reason=f"bad frame: {e}")
                self._drop(client)
                return
            batch.extend((client, msg) for msg in msgs)

    def _drop(self, client: Peer) -> None:
        if self.clients.pop(client.conn, None) is None:
            return
        if client.sock is not None:
            client.sock.close()
        client.conn.close()
        self.behaviour.on_disconnect(client)

    def process(self, batch: list[tuple[Peer, dict[str, Any]]], *, tick: bool) -> None:
        """Apply a batch in one transaction, commit, then answer. The periodic tick runs in a transaction of its
        own, so that a failing tick rolls back alone and cannot take the messages (or the actor) with it."""
        answers: list[tuple[Peer, int, dict[str, Any]]] = []
        telemetry = self.behaviour.telemetry  # its counts stand once the transaction commits

        def messages(tx: Tx) -> list[tuple[Peer, int, dict[str, Any]]]:
            answers.clear()  # (a retry after a busy database starts over)
            telemetry.discard()
            for client, msg in batch:
                answer = self._handle(tx, client, msg)
                if answer is not None and msg.get("id") is not None:
                    answers.append((client, msg["id"], answer))
            answers.extend(self.behaviour.drain_answers())
            self.behaviour.before_commit(tx)
            return answers

        def periodic(tx: Tx) -> list[tuple[Peer, int, dict[str, Any]]]:
            answers.clear()
            telemetry.discard()
            answers.extend(self.behaviour.tick(tx, time.time()))
            answers.extend(self.behaviour.drain_answers())
            self.behaviour.before_commit(tx)
            return answers

        out: list[tuple[Peer, int, dict[str, Any]]] = []
        if batch:
            try:
                out += self.db.batch(messages, f"{self.actor} batch")
                telemetry.commit()
                self._store_ok()
            except StoreError as e:
                telemetry.discard()
                self._store_failed(e, [(c, m["id"]) for c, m in batch if m.get("id") is not None] + answers)
        if tick:
            try:
                out += self.db.batch(periodic, f"{self.actor} tick")
                telemetry.commit()
                self._store_ok()
            except StoreError as e:
                telemetry.discard()
                self._store_failed(e, answers)
            except Exception as e:  # a bug in periodic work: log it, start its state afresh, keep serving
                telemetry.discard()
                self.behaviour.on_tick_failed()
                self.log.error("actor.tick_failed", error=f"{type(e).__name__}: {e}"[:300])
        self.ctx.slot.idle()
        self._send(out)

    def _store_failed(self, e: StoreError, asks: list[tuple[Any, ...]]) -> None:
        """The database refused the transaction (disk full, read-only, locked past every retry, ...): nothing of
        it was stored, so nothing of it is answered as done. Every ask it held is answered "unavailable" (the
        client sees ActorUnavailable at once, not a timeout; an op id makes its retry exactly-once), memory is
        rebuilt from SQLite, and the actor keeps serving: the next batch tries again. Logged once per outage."""
        told = {(peer, msg_id) for peer, msg_id, *_ in asks}
        told.update(self.behaviour.on_store_failed())
        err = _error("unavailable", f"{self.actor}: {e}"[:500])
        self._send([(peer, msg_id, err) for peer, msg_id in told])
        self.store_failures += 1
        if self.store_failing_since is None:
            self.store_failing_since = time.monotonic()
            self.log.error("actor.store_failing", reason=str(e)[:300],
                           answering="unavailable to every ask until the database takes writes again")

    def _store_ok(self) -> None:
        if self.store_failing_since is not None:
            failed_for = round(time.monotonic() - self.store_failing_since, 1)
            self.log.warning("actor.store_recovered", failed_for_s=failed_for, batches_refused=self.store_failures)
            self.store_failing_since, self.store_failures = None, 0

    def _send(self, answers: list[tuple[Peer, int, dict[str, Any]]]) -> None:
        by_client: dict[Peer, list[dict[str, Any]]] = {}
        for client, msg_id, answer in answers:
            by_client.setdefault(client, []).append({"id": msg_id, **answer})
        for client, out in by_client.items():  # one frame per client per batch: one write, one read
            if client.conn not in self.clients:
                continue
            client.queue(protocol.encode(out[0] if len(out) == 1 else {"m": out}))
            if len(client.out) > MAX_UNREAD:
                self.log.warning("gateway.refused", pid=client.pid,
                                 reason=f"left over {MAX_UNREAD} bytes of answers unread; disconnected")
                self._drop(client)
            elif not client.flush():
                self._drop(client)

    def _flush_pending(self) -> bool:
        """Write more of every answer a slow client has not taken yet; whether any is still pending."""
        pending = False
        for peer in [p for p in self.clients.values() if p.out]:
            if not peer.flush():
                self._drop(peer)
            pending = pending or bool(peer.out)
        return pending

    def _handle(self, tx: Tx, client: Peer, msg: dict[str, Any]) -> dict[str, Any] | None:
        op, args = msg["op"], msg.get("a", {})
        spec = self.ops.get(op)
        # (An op nobody knows is counted under one name: a client must not grow the figures without bound.)
        self.behaviour.telemetry.counts[("messages", op if spec is not None else "(unknown)")] += 1
        if spec is None:
            return _error("bad_request", f"unknown op {op!r} for {self.actor}; expected one of: "
                                         f"{', '.join(self.ops)}")
        struct_type, method, *flags = spec
        if struct_type is not None:
            try:
                args = msgspec.convert(args, struct_type, strict=True)
            except msgspec.ValidationError as e:
                return _error("bad_request", f"{op}: {e}")
        # Only a message that says who it is (an op id, a permit) can be told apart from the next one: only those
        # are counted towards the dead-letter table. (A check on a hot key must not be dead-lettered because
        # the actor was killed three times while such checks were running.)
        raw = msg.get("a", {})
        fp = protocol.fingerprint(self.actor, op, raw) if ("op_id" in raw or "permit" in raw) else None
        if fp is not None and self.failures.get(fp, 0) >= MAX_FAILURES:
            return self._dead_letter(tx, fp, msg, "moved to the dead-letter table after failing 3 times")
        # An op whose handler makes at most one write, as its last step (flag SINGLE), needs no savepoint:
        # SQLite makes one statement atomic, and a failure before it wrote nothing.
        savepoint = SINGLE not in flags
        if savepoint:
            tx.savepoint()
        self.ctx.slot.begin(int(fp, 16) if fp else 0, time.monotonic())
        try:
            result = getattr(self.behaviour, method)(tx, client, args, msg.get("id"))
            if savepoint:
                tx.release()
        except protocol.ActorError as e:  # a refusal (bad argument): an answer, not a failure
            self._rollback(tx, savepoint)
            return _error(e.code, str(e))
        except InputError as e:  # a store operation refused an argument: an answer too
            self._rollback(tx, savepoint)
            self.behaviour.on_rollback()
            return _error("bad_request", str(e))
        except Exception as e:  # the handler failed on this message: roll it back alone and count it
            self._rollback(tx, savepoint)
            self.behaviour.on_rollback()
            if fp is None:
                self.log.error("actor.message_failed", op=op, error=f"{type(e).__name__}: {e}"[:300])
                return _error("failed", f"{op} failed: {type(e).__name__}: {e}"[:500])
            return self._failed(tx, fp, msg, f"{type(e).__name__}: {e}")
        finally:
            self.ctx.slot.end()
        if fp is not None and fp in self.failures:  # it succeeded after all: its count starts again
            del self.failures[fp]
            dead_letters.clear_failure(tx, fp)
        if result is DEFER:
            return None
        return {"ok": True, "r": result}

    @staticmethod
    def _rollback(tx: Tx, savepoint: bool) -> None:
        if savepoint:
            tx.rollback_to_savepoint()

    def _failed(self, tx: Tx, fp: str, msg: dict[str, Any], error: str) -> dict[str, Any]:
        count = dead_letters.record_failure(tx, self.actor, fp, error, time.time())
        self.failures[fp] = count
        self.log.error("actor.message_failed", op=msg.get("op"), fingerprint=fp, failures=count, error=error[:300])
        if count >= MAX_FAILURES:
            return self._dead_letter(tx, fp, msg, error)
        return _error("failed", f"{msg.get('op')} failed ({count} of {MAX_FAILURES}): {error}"[:500])

    def _dead_letter(self, tx: Tx, fp: str, msg: dict[str, Any], error: str) -> dict[str, Any]:
        dead_letters.add(tx, self.actor, fp, protocol.encode({"op": msg.get("op"), "a": msg.get("a", {})}).decode(),
                         error, self.failures.get(fp, MAX_FAILURES), time.time())
        self.log.error("actor.dead_letter", op=msg.get("op"), fingerprint=fp)
        return _error("dead_letter", f"{msg.get('op')}: this message failed {MAX_FAILURES} times and was moved to "
                                     "the dead-letter table (actor_dead_letters)")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "err": message}


BEHAVIOURS = {
    "counter": "cardq.actors.counter:Counter",
    "ratelimit": "cardq.actors.ratelimit:RateLimiter",
    "paths": "cardq.actors.paths:PathCollector",
}


def main(ctx: ChildContext) -> int:
    """Child target ("cardq.actors.server:main"); spec args {"actor": name, "shard": n}."""
    import importlib

    module, _, cls = BEHAVIOURS[ctx.spec.args["actor"]].partition(":")
    behaviour = getattr(importlib.import_module(module), cls)
    try:
        return ActorServer(ctx, behaviour).run()
    except Error as e:  # its database or key file cannot be used: one line, and the supervisor restarts it
        logs.get(actor=ctx.spec.args["actor"], shard=ctx.spec.args["shard"]).error("actor.failed", reason=str(e))
        return EXIT_STORE
