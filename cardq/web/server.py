"""The HTTP server as a child of the supervisor ("cardq.web.server:main"): binds [http] listen, serves the app
with uvicorn, and stops when the supervisor says so.

What uvicorn does not do, done here:
- a header deadline: a request's headers must arrive within header_timeout_s of its first byte (of the connection
  being opened, for the first one), else the connection is closed — a client trickling headers at 1 byte/s
  (slowloris) holds a connection for that long, not for ever;
- quiet idling: uvicorn wakes 10 times a second to refresh its Date header; here the loop sleeps while no
  connection is open (an idle cardq tree costs ~0.1 % of a core, and this process must not be what changes that);
- signals belong to the child (SIGTERM: stop; SIGINT is the supervisor's to decide), not to uvicorn;
- the socket is bound here, retried while the address is taken (another program on the port must not stop the
  job system: the error is logged and the bind retried), and the address actually bound is written to
  <run_dir>/http.json, so "127.0.0.1:0" (any free port) is usable by tests and tools.
A change of [http] in a reloaded config.toml restarts this child (it exits, the supervisor starts it anew).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Iterator
from typing import Any

import orjson
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cardq import logs
from cardq.children import EXIT_STOPPED, ChildContext
from cardq.config import LoadedConfig, parse_config, parse_listen, resolve_path
from cardq.running import HTTP_ADDRESS_FILE
from cardq.web.app import Web, endpoint, request_id
from cardq.web.problems import HTTPProblem, response
from cardq.web.routes import ROUTES

BIND_RETRY_S = (0.5, 30.0)  # first and longest pause between attempts to bind a taken address
DRAIN_S = 5.0  # at stop: in-flight requests get this long to finish
MAX_HEADER_BYTES = 64 * 1024  # a request line and its headers (nginx's default large buffers hold 32 KiB)
HEADERS_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                     b"connection: close\r\ncontent-length: 42\r\n\r\nrequest headers over 65536 bytes; closing\n")


class GuardedProtocol(HttpToolsProtocol):
    """httptools' protocol with the header deadline, and a nudge to the server's loop on each connection."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._arm()
        self.config.cardq_nudge.set()  # the loop refreshes the Date header while connections are open

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(self.config.cardq_header_timeout_s, self._too_slow)

    def data_received(self, data: bytes) -> None:
        # The deadline bounds the headers' time, this their size: httptools keeps every header line it is given,
        # so a client streaming header lines fast would grow this process by hundreds of MB a second.
        if self._header_timer is not None:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._disarm()
                if not self.transport.is_closing():
                    self.transport.write(HEADERS_TOO_LARGE)
                    self.transport.close()
                return
        super().data_received(data)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        # The client closed its side: the transport closes now and connection_lost comes on the next loop turn.
        # Counted out of the open connections at once, or a request that arrived on another connection in the
        # same turn would be refused (503, max_connections) for this one, which is already gone.
        self.connections.discard(self)

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            logs.get().debug("http.header_timeout", client=_peer(self.client),
                            header_timeout_s=self.config.cardq_header_timeout_s)
            self.transport.close()


class QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the child's own handlers stay: see the module's docstring

    async def main_loop(self) -> None:
        nudge = self.config.cardq_nudge
        while True:
            if await self.on_tick(0):  # (0: refresh the Date header now) True once should_exit is set
                return
            nudge.clear()
            if self.server_state.connections:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(nudge.wait(), 1.0)
            else:
                await nudge.wait()

    def stop(self) -> None:
        self.should_exit = True
        self.config.cardq_nudge.set()


class App:
    """The ASGI app. A request for a route without path parameters (the hot ones: /healthz, rate-limit checks,
    events, submits) goes straight to its endpoint, found in one dict; the rest go through Starlette's router
    (path parameters, HEAD, 404 and 405). Same endpoints, same answers either way: the shortcut only skips
    matching the route table in order and two middlewares that have nothing to do here (every endpoint turns
    its own errors into problems), about a sixth of /healthz's cost."""

    def __init__(self, starlette: Starlette, exact: dict[tuple[str, str], Any]):
        self.starlette, self.exact = starlette, exact
        self.state = starlette.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = self.exact.get((scope["method"], scope["path"]))
            if handler is not None:
                scope["app"] = self.starlette  # (what the endpoint reads its state from, as under Starlette)
                resp = await handler(Request(scope, receive))
                await resp(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def build(q: Any, *, log: Any) -> App:
    routes = [Route(r.path, endpoint(r.scope, r.handler), methods=[r.method]) for r in ROUTES]
    app = Starlette(routes=routes)
    app.state.web = Web(q, log=log)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        rid = request_id(request)
        detail = ("no such endpoint; see /openapi.json" if status == 404 else
                  f"method {request.method} not allowed here; see /openapi.json")
        return response(HTTPProblem(status, "not-found" if status == 404 else "method-not-allowed", detail), rid,
                        request.url.path)

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    return App(app, {(r.method, r.path): route.endpoint for r, route in zip(ROUTES, routes, strict=True)
                     if "{" not in r.path})


def main(ctx: ChildContext) -> int:
    from cardq.api import Queue

    log = logs.get(child=ctx.spec.name)
    _route_stdlib_logging(log)
    q = Queue(ctx.loaded, name="http")
    app = build(q, log=log)
    try:
        # uvloop, not asyncio's own loop: libuv's transports and callbacks cost this process 15-20 % less CPU per
        # request (benchmarks/bench_http.py); it sleeps when idle like asyncio's.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(ctx, app, log))
    finally:
        app.state.web.close()
        q.close()
        _unpublish(ctx.loaded)


async def _serve(ctx: ChildContext, app: Any, log: Any) -> int:
    loaded = ctx.loaded
    http = loaded.config.http
    loop = asyncio.get_running_loop()
    config = uvicorn.Config(
        app, http=GuardedProtocol, loop="none", lifespan="off", log_config=None, access_log=False,
        proxy_headers=False, server_header=False, date_header=True, timeout_keep_alive=http.keepalive_s,
        # uvicorn counts the connection being refused among the open ones: +1 admits exactly max_connections.
        limit_concurrency=http.max_connections + 1, timeout_graceful_shutdown=DRAIN_S,
        ssl_certfile=str(resolve_path(http.tls_cert, loaded.config_dir)) if http.tls_cert else None,
        ssl_keyfile=str(resolve_path(http.tls_key, loaded.config_dir)) if http.tls_key else None)
    config.cardq_nudge = asyncio.Event()
    config.cardq_header_timeout_s = http.header_timeout_s
    server = QuietServer(config)
    stopped = asyncio.Event()

    def stop() -> None:
        ctx.stop_requested[0] = True
        app.state.web.stopping = True  # long polls answer within their next pause instead of being cancelled
        stopped.set()
        server.stop()

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_reader(ctx.channel.conn.fileno(), _commands, ctx, loaded, stop, log)
    sock = await _bind(loaded, config, stopped, log)
    if sock is None:
        return EXIT_STOPPED
    _publish(loaded, sock)
    ctx.slot.idle()
    log.info("http.listening", url=_url(loaded, sock), max_connections=http.max_connections)
    await server.serve(sockets=[sock])
    return EXIT_STOPPED


def _commands(ctx: ChildContext, loaded: LoadedConfig, stop: Any, log: Any) -> None:
    msg = ctx.channel.recv()
    if msg is None or msg.get("cmd") == "stop":
        stop()
        return
    if msg.get("cmd") == "config":
        new = parse_config(msg["text"].encode(), msg.get("path") or "config.toml")
        if new.log.level != loaded.config.log.level:
            logs.set_level(new.log.level)
        if new.http != loaded.config.http:  # a new address, TLS files or limits: start again with them
            log.info("http.restarting", reason="[http] changed in config.toml")
            stop()


async def _bind(loaded: LoadedConfig, config: uvicorn.Config, stopped: asyncio.Event,
                log: Any) -> socket.socket | None:
    """The listening socket, TLS files loaded; while the address is taken or the TLS files cannot be read,
    retry (logged once per reason) until it works or we are stopped. Exiting instead would have the supervisor
    restart us in a loop until its restart intensity stops the whole tree: a bad port or certificate must not
    stop the job system."""
    pause, said = BIND_RETRY_S[0], ""
    while not stopped.is_set():
        try:
            if not config.loaded:
                config.load()  # reads tls_cert and tls_key
            return _listen(loaded)
        except (OSError, ssl.SSLError) as e:
            what = "tls" if not config.loaded else "bind"
            reason = f"{what}: {getattr(e, 'strerror', None) or e}"
            if reason != said:
                log.error(f"http.{what}_failed", listen=loaded.config.http.listen, reason=reason[len(what) + 2:],
                          retry="until it works; the job system runs on meanwhile")
                said = reason
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), pause)
        pause = min(pause * 2, BIND_RETRY_S[1])
    return None


def _listen(loaded: LoadedConfig) -> socket.socket:
    where = parse_listen(loaded.config.http.listen)
    if isinstance(where, str):
        path = resolve_path(where, loaded.config_dir)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()  # a predecessor's socket file (only a socket: never delete a file by mistake)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)
    else:
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for such a socket (uvloop
        # sets it on any TCP socket). Without it, a response written in two parts (headers, body) waited for the
        # client's delayed ACK: ~40 ms added to every request on a keep-alive connection (/healthz took 44 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(loaded: LoadedConfig, sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    scheme = "https" if loaded.config.http.tls_cert else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _publish(loaded: LoadedConfig, sock: socket.socket) -> None:
    """<run_dir>/http.json: where the server listens now (the port taken for "host:0"), for tools and tests."""
    target = loaded.run_dir / HTTP_ADDRESS_FILE
    tmp = target.with_suffix(".tmp")
    with contextlib.suppress(OSError):  # the address is also in the log; a full disk must not stop the server
        tmp.write_bytes(orjson.dumps({"url": _url(loaded, sock), "pid": os.getpid()}))
        os.replace(tmp, target)


def _unpublish(loaded: LoadedConfig) -> None:
    target = loaded.run_dir / HTTP_ADDRESS_FILE
    with contextlib.suppress(OSError, ValueError):
        if orjson.loads(target.read_bytes()).get("pid") == os.getpid():
            target.unlink()


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if isinstance(client, tuple) else str(client or "?")


class _ToOurLog(logging.Handler):
    """uvicorn's own messages (a malformed request line, a failed TLS handshake) as our one-line log events."""

    def __init__(self, log: Any):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        getattr(self.log, level)("http.server_message", message=record.getMessage()[:300])


def _route_stdlib_logging(log: Any) -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = [_ToOurLog(log)]
        lg.propagate = False
        lg.setLevel(logging.WARNING)


__all__ = ["main"]
