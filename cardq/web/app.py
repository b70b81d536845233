"""The ASGI app: routes (routes.py) behind one wrapper that does, for every request, what every request needs —
a request id (taken from X-Request-Id when sane, echoed back), the bearer token and its scope, a capped body,
strict JSON decoding, and errors as RFC 9457 problems, each logged once with its request id, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from cardq import tokens
from cardq.children import raised_at
from cardq.errors import Error
from cardq.web.leases import GateLeases
from cardq.web.problems import HTTPProblem, from_error, response

T = TypeVar("T")
SCOPE_RANK = {"read": 0, "app": 1, "admin": 2}  # admin may do what app may, app what read may
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
TOKEN_CACHE_S = 1.0  # a revoked token stops working within this long
TOKEN_CACHE_MAX = 10_000
SUBMIT_GROUP_ITEMS = 2_000  # most items in a group of POST /v1/jobs (see Grouped; one submit may be larger)
EVENTS_GROUP_MAX = 5_000  # most events in a group of POST /v1/events (see Grouped; one array may be larger)


class Web:
    """What the handlers share: the Queue (public API), a bounded pool for its blocking calls, the token cache
    and the gate leases."""

    def __init__(self, q: Any, *, log: Any):
        http = q.config.config.http
        self.q, self.log = q, log
        self.http = http
        self.pool = ThreadPoolExecutor(http.threads, thread_name_prefix="cardq-http")
        self.leases = GateLeases(q, max_leases=http.max_gate_leases, default_lease_s=http.gate_lease_s, log=log)
        self._tokens: dict[str, tuple[float, tuple[int, str] | None]] = {}
        # Submits: one group at a time (one writer: groups would only queue for SQLite's lock), of a bounded number
        # of items (a group's transaction holds the write lock the workers claim with). Events: a few groups, so
        # that one is validated here while the collector commits the one before.
        self._submits = Grouped(self, q.submit_many, cap=SUBMIT_GROUP_ITEMS, weight=lambda r: len(r["items"]))
        self._events = Grouped(self, q.record_events_many, cap=EVENTS_GROUP_MAX, parallel=4, weight=len)
        self.started_at = time.time()
        self.waits = 0  # long polls now (GET /v1/jobs/{id}/wait), at most http.max_waits
        self.stopping = False  # the server is draining: long polls answer now (the state then) rather than be cut

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A blocking call of the public API, on the pool: the event loop never waits on SQLite or an actor."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kw))

    async def submit(self, **request: Any) -> Any:
        """Queue.submit(**request), grouped (see Grouped): a group is one transaction (Queue.submit_many) — one
        commit and one ring of the doorbell for many clients, and never the server's own threads queueing for
        SQLite's write lock. Each submit is still all or nothing on its own and gets what Queue.submit gives or
        raises."""
        return await self._submits(request)

    async def record_events(self, events: list[Any]) -> Any:
        """Queue.record_events(events), grouped (see Grouped): a group's events travel to the collector as one
        frame of pipelined asks (Queue.record_events_many), each array validated and answered on its own."""
        return await self._events(events)

    async def authorize(self, request: Request, scope: str) -> int:
        """The token's id, or 401/403."""
        header = header_of(request, b"authorization") or ""
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token:
            raise HTTPProblem(401, "unauthorized", "a bearer token is required: Authorization: Bearer <token> "
                              "(make one with `cardq token create --scope read|app|admin`)",
                              {"WWW-Authenticate": 'Bearer realm="cardq"'})
        found = await self._token(token.strip())
        if found is None:
            raise HTTPProblem(401, "unauthorized", "the bearer token is unknown or revoked",
                              {"WWW-Authenticate": 'Bearer realm="cardq", error="invalid_token"'})
        token_id, has = found
        if SCOPE_RANK[has] < SCOPE_RANK[scope]:
            challenge = f'Bearer realm="cardq", error="insufficient_scope", scope="{scope}"'
            raise HTTPProblem(403, "forbidden", f"this token's scope is {has!r}; this call needs {scope!r}",
                              {"WWW-Authenticate": challenge}, token_id=token_id)
        return token_id

    async def _token(self, token: str) -> tuple[int, str] | None:
        key = tokens.digest(token)
        now = time.monotonic()
        hit = self._tokens.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self.run(self.q.token_scope, token)
        if len(self._tokens) >= TOKEN_CACHE_MAX:  # a client trying random tokens must not grow it without end
            self._tokens.clear()
        self._tokens[key] = (now + TOKEN_CACHE_S, found)
        return found

    async def body(self, request: Request, typ: type[T] | None = None) -> T | Any:
        """The JSON body, at most max_body_bytes (413 past it, counted as it arrives: a chunked body too),
        decoded strictly into `typ` (400 naming the field), or as plain JSON."""
        cap = self.http.max_body_bytes
        declared = header_of(request, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > cap:
            raise HTTPProblem(413, "too-large", f"body of {declared} bytes: expected at most {cap} "
                              "([http] max_body_bytes)", max_body_bytes=cap)
        ctype = header_of(request, b"content-type") or "application/json"
        # (curl -d sends x-www-form-urlencoded, some fetch() calls text/plain: the body is parsed as JSON anyway)
        if "json" not in ctype and not ctype.startswith(("application/x-www-form-urlencoded", "text/plain")):
            raise HTTPProblem(415, "unsupported-media-type", f"content-type {ctype[:80]!r}: expected application/json")
        chunks, size, receive = [], 0, request.receive
        deadline = asyncio.get_running_loop().time() + self.http.body_timeout_s
        while True:  # (what request.stream() does, without an async generator per request)
            try:  # a body that never comes must not hold its connection (and a place under max_connections)
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPProblem(408, "body-timeout", f"the request body did not arrive within "
                                  f"{self.http.body_timeout_s:g} s ([http] body_timeout_s)",
                                  {"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise HTTPProblem(413, "too-large", f"body over {cap} bytes ([http] max_body_bytes)",
                                  max_body_bytes=cap)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            return msgspec.json.decode(raw, type=typ) if typ is not None else msgspec.json.decode(raw)
        except msgspec.ValidationError as e:
            reason, _, where = str(e).partition(" - at `$")
            field = where.rstrip("`").lstrip(".") or "body"
            unknown = re.match(r"Object contains unknown field `(.+)`", reason)
            if unknown:
                allowed = ", ".join(typ.__struct_fields__) if typ is not None else ""
                field = f"{field}.{unknown.group(1)}" if field != "body" else unknown.group(1)
                raise HTTPProblem(400, "bad-input", f"{field}: unknown field; expected one of: {allowed}",
                                  where=field) from None
            raise HTTPProblem(400, "bad-input", f"{field}: {reason[0].lower()}{reason[1:]}", where=field) from None
        except msgspec.DecodeError as e:
            raise HTTPProblem(400, "bad-json", f"body: {e}; expected a JSON document", where="body") from None
        except RecursionError:
            raise HTTPProblem(400, "bad-json", "body: nested too deeply; expected a JSON document of at most a few "
                              "hundred levels", where="body") from None

    def close(self) -> None:
        self.leases.release_all()
        self.pool.shutdown(wait=False, cancel_futures=True)


class Grouped:
    """Calls of a `many` function (one argument per call; a list of answers in order, each an answer or an
    Exception to raise) made from the loop: the calls that arrive while `parallel` groups are running on the pool
    wait for the next group, of at most `cap` in weight. One thread hop and one round trip per group instead of
    per call; nothing waits for a group to fill."""

    def __init__(self, web: Web, many: Callable[[list[Any]], list[Any]], *, cap: int, parallel: int = 1,
                 weight: Callable[[Any], int] = lambda _: 1):
        self.web, self.many, self.cap, self.parallel, self.weight = web, many, cap, parallel, weight
        self.waiting: list[tuple[Any, asyncio.Future]] = []
        self.running = 0

    async def __call__(self, arg: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append((arg, fut))
        if self.running < self.parallel:
            self.running += 1
            loop.create_task(self._groups())
        return await fut

    async def _groups(self) -> None:
        try:
            while self.waiting:
                n, total = 0, 0
                while n < len(self.waiting) and (n == 0 or total + self.weight(self.waiting[n][0]) <= self.cap):
                    total += self.weight(self.waiting[n][0])
                    n += 1
                group, self.waiting = self.waiting[:n], self.waiting[n:]
                try:
                    answers: list[Any] = await self.web.run(self.many, [arg for arg, _ in group])
                except Exception as e:  # the group failed as a whole (StoreBusy, ...): each call gets the error
                    answers = [e] * len(group)
                for (_, fut), answer in zip(group, answers, strict=True):
                    if fut.done():  # (its request was cancelled: the client went away)
                        continue
                    if isinstance(answer, Exception):
                        fut.set_exception(answer)
                    else:
                        fut.set_result(answer)
        finally:
            self.running -= 1


def header_of(request: Request, name: bytes) -> str | None:
    """A request header's value (name in lower case; the first if repeated, as request.headers.get gives it),
    from a dict made once per request: Starlette's Headers scans every header on each lookup."""
    found = request.scope.get("cardq.headers")
    if found is None:
        found = request.scope["cardq.headers"] = dict(reversed(request.scope["headers"]))
    value = found.get(name)
    return None if value is None else value.decode("latin-1")


def request_id(request: Request) -> str:
    """The caller's X-Request-Id when it is sane, else a new one (16 hex digits)."""
    given = header_of(request, b"x-request-id") or ""
    return given if REQUEST_ID_RE.match(given) else os.urandom(8).hex()  # (as uuid4().hex[:16], 7x cheaper)


def json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)


Handler = Callable[[Web, Request], Awaitable[Response]]


def endpoint(scope: str | None, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The wrapper every route goes through (see the module's docstring). scope None: no token needed."""

    async def asgi_endpoint(request: Request) -> Response:
        web: Web = request.app.state.web
        rid = request_id(request)
        try:
            if scope is not None:
                await web.authorize(request, scope)
            resp = await handler(web, request)
        except HTTPProblem as p:
            problem = p
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to log as a failure
            return Response(status_code=499)
        except Error as e:
            problem = from_error(e)
        except Exception as e:  # a bug: one line with where it happened; the client gets no internals
            web.log.error("http.failed", request_id=rid, method=request.method, path=request.url.path,
                          error=f"{type(e).__name__}: {e}"[:300], at=raised_at(e))
            return response(HTTPProblem(500, "internal", "internal error (the server log has the details under "
                                        "this request id)"), rid, request.url.path)
        else:
            resp.raw_headers.append((b"x-request-id", rid.encode("latin-1")))  # (no handler sets it: no lookup)
            return resp
        level, event = (("info", "http.refused") if problem.status < 500 else ("info", "http.unavailable")
                        if problem.status == 503 else ("error", "http.failed"))
        getattr(web.log, level)(event, request_id=rid, method=request.method, path=request.url.path,
                                status=problem.status, detail=problem.detail[:300])
        return response(problem, rid, request.url.path)

    return asgi_endpoint

