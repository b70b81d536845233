"""An asyncio client to the actors, for code that runs on an event loop (the HTTP server): one connection per
actor shard, shared by every task of the loop; no thread per ask.

The asks made during one turn of the loop travel together, as one frame (one write here, one read and one batch
— one commit — at the actor, which answers them in one frame too); answers are matched to their asks by id. A
connection is opened by the thread-side client (actors/client.py: the handshake, its reconnect pauses and its
errors, the hello frame) on the loop's executor, then handed to the loop. As with ActorClient, an ask whose
connection breaks is sent again on a new one until its deadline; past it, ActorUnavailable (never connected) or
ActorTimeout (sent, no answer).

One AsyncActorClient belongs to one event loop: make it, use it and close it on that loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any

from cardq.actors import protocol
from cardq.actors.client import FRAME_BUDGET, WINDOW, ActorClient, _result
from cardq.config import LoadedConfig
from cardq.errors import ActorError, ActorTimeout

SWEEP_S = 0.1  # how often a connection with asks waiting looks for ones past their deadline (none waiting: never)


class _Lost(Exception):
    """The connection broke with the ask unanswered (sent again on a new one)."""


class _Link(asyncio.Protocol):
    """One connection to one actor shard: asks queued during a loop turn are written at its end as one frame."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, tuple[asyncio.Future, float]] = {}  # msg id -> (its answer, its deadline)
        self.outbox: list[bytes] = []  # frames of asks not written yet
        self.buf = bytearray()
        self.lost = False
        self.sweeper: asyncio.TimerHandle | None = None  # one timer for every waiting ask, not one per ask

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def ask(self, msg_id: int, frame: bytes, deadline: float) -> asyncio.Future:
        fut = self.loop.create_future()
        self.waiting[msg_id] = (fut, deadline)
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(frame)
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(SWEEP_S, self._sweep)
        return fut

    def _sweep(self) -> None:
        """Fail the asks past their deadline (ActorTimeout, within SWEEP_S of it); again later while any wait."""
        self.sweeper = None
        now = self.loop.time()
        for msg_id, (fut, deadline) in list(self.waiting.items()):
            if fut.done():  # (cancelled: its caller went away)
                del self.waiting[msg_id]
            elif deadline <= now:
                del self.waiting[msg_id]
                fut.set_exception(ActorTimeout("no answer in time", "timeout"))
        if self.waiting and not self.lost:
            self.sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def _flush(self) -> None:
        out, self.outbox = self.outbox, []
        if self.lost or self.transport is None:
            return  # (their futures have failed with _Lost already)
        while out:
            n, size = 1, len(out[0])
            while n < len(out) and n < WINDOW and size < FRAME_BUDGET:
                size += len(out[n])
                n += 1
            chunk, out = out[:n], out[n:]
            frame = protocol.combine(chunk)
            # multiprocessing.connection framing, as the actor reads it: a big-endian int32 length first
            self.transport.write(struct.pack("!i", len(frame)) + frame)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            size, header = struct.unpack_from("!i", buf)[0], 4
            if size == -1:
                if len(buf) < 12:
                    return
                size, header = struct.unpack_from("!Q", buf, 4)[0], 12
            if len(buf) < header + size:
                return
            try:
                frame = protocol.decode(bytes(buf[header:header + size]))
            except protocol.BadFrame:
                self.transport.close()  # (connection_lost fails what waits: sent again on a new connection)
                return
            del buf[:header + size]
            for answer in frame.get("m", [frame]):
                waiting = self.waiting.pop(answer.get("id"), None)
                if waiting is not None and not waiting[0].done():  # (None: a late answer to one that timed out)
                    waiting[0].set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        waiting, self.waiting = self.waiting, {}
        for fut, _ in waiting.values():
            if not fut.done():
                fut.set_exception(_Lost())


class AsyncActorClient:
    def __init__(self, loaded: LoadedConfig, *, name: str = ""):
        self.sync = ActorClient.from_config(loaded, name=name)  # opens the connections (never asks itself)
        self.timeout_s = self.sync.timeout_s
        self._links: dict[tuple[str, int], _Link] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resent = 0
        self.closed = False

    async def ask(self, actor: str, key: str, op: str, args: dict[str, Any], *,
                  timeout: float | None = None) -> Any:
        """One request; its result, or the actor's error raised (as ActorClient.ask)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout is None else timeout)
        shard = protocol.shard_of(key, self.sync._shards(actor))
        self._next_id += 1
        msg_id = self._next_id
        frame = protocol.encode({"id": msg_id, "op": op, "a": args})
        while True:
            link = self._links.get((actor, shard))
            if link is None or link.lost:
                link = await self._link(actor, shard, loop, deadline)
            try:
                answer = await link.ask(msg_id, frame, deadline)
            except _Lost:
                self.resent += 1
                if loop.time() >= deadline:
                    raise ActorTimeout(f"{actor} shard {shard}: connection lost, no answer within "
                                       f"{self.timeout_s:g}s", "timeout") from None
                continue
            except ActorTimeout:
                raise ActorTimeout(f"{actor} shard {shard}: no answer within {self.timeout_s:g}s",
                                   "timeout") from None
            result = _result(answer)
            if isinstance(result, ActorError):
                raise result
            return result

    async def _link(self, actor: str, shard: int, loop: asyncio.AbstractEventLoop, deadline: float) -> _Link:
        where = (actor, shard)
        link = self._links.get(where)
        if link is not None and not link.lost:
            return link
        pending = self._connecting.get(where)
        if pending is None:  # one connect per shard at a time; the other asks wait for it
            pending = self._connecting[where] = loop.create_task(self._connect(actor, shard, loop, deadline))
            pending.add_done_callback(lambda _: self._connecting.pop(where, None))
        return await asyncio.shield(pending)

    async def _connect(self, actor: str, shard: int, loop: asyncio.AbstractEventLoop, deadline: float) -> _Link:
        # The handshake (HMAC both ways) and the hello frame are the thread-side client's, blocking: on the
        # executor. The same errors as its asks: ActorUnavailable at once when no supervisor runs.
        left = deadline - loop.time()
        conn = await loop.run_in_executor(None, self.sync.open_link, actor, shard, left)
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        finally:
            conn.close()
        sock.setblocking(False)
        try:
            _, link = await loop.create_unix_connection(lambda: _Link(loop), sock=sock)
        except BaseException:
            sock.close()
            raise
        if self.closed:
            link.transport.close()
            raise ActorError("the client was closed", "closed")
        self._links[(actor, shard)] = link
        return link

    def close(self) -> None:
        """Close every connection (on the client's loop, or after that loop has stopped)."""
        self.closed = True
        for link in self._links.values():
            if link.transport is not None:
                link.transport.close()
        self._links.clear()
        self.sync.close()
