"""Every endpoint: one small async handler each, calling the public API (cardq.api.Queue) on the pool.

ROUTES is the one table: the app mounts it and /openapi.json is made from it, so the document cannot drift from
what is served.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from cardq.vocabulary import FINISHED, STATUSES
from cardq.web import schemas
from cardq.web.app import Web, json
from cardq.web.problems import HTTPProblem

STATIC = Path(__file__).parent / "static"
WAIT_MAX_S = 300.0
WAIT_STEP_S = (0.01, 0.5)  # long poll: first and longest pause between looks while nothing commits


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "integer", "number", "string"
    doc: str
    required: bool = False
    lo: float | None = None  # the bounds the handler enforces, for the document
    hi: float | None = None


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    scope: str | None
    handler: Any
    summary: str
    body: type | None = None
    params: tuple[Param, ...] = ()
    ok: int = 200
    errors: tuple[int, ...] = field(default=())


# ---- query parameters --------------------------------------------------------------------------------------------

def int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    return _number_param(request, name, default, lo, hi, int, "a whole number")


def float_param(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    return _number_param(request, name, default, lo, hi, float, "a number")


def _number_param(request: Request, name: str, default: Any, lo: Any, hi: Any, kind: type, what: str) -> Any:
    """?name= parsed by `kind`, within [lo, hi] (NaN is in no range), or 400 naming it; `default` when absent."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        shown = (lambda x: f"{x:g}") if kind is float else str
        raise HTTPProblem(400, "bad-input", f"{name}={raw[:40]!r}: expected {what} from {shown(lo)} to {shown(hi)}",
                          where=name)
    return value


def path_int(request: Request, name: str) -> int:
    raw = request.path_params[name]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # (isdigit alone takes "²", which int() refuses)
        raise HTTPProblem(400, "bad-input", f"{name} {raw[:40]!r}: expected a positive whole number", where=name)
    return int(raw)


# ---- health --------------------------------------------------------------------------------------------------------

async def healthz(web: Web, request: Request) -> Response:
    return json({"status": "ok"})


async def readyz(web: Web, request: Request) -> Response:
    checks = await web.run(web.q.readiness)
    failing = {k: v for k, v in checks.items() if v is not None}
    if failing:
        name, why = next(iter(failing.items()))
        raise HTTPProblem(503, "not-ready", f"{name}: {why}", {"Retry-After": "1"},
                          checks={k: v or "ok" for k, v in checks.items()})
    return json({"status": "ready", "checks": {k: "ok" for k in checks}})


# ---- jobs ----------------------------------------------------------------------------------------------------------

async def submit_jobs(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.SubmitJobs)
    batch = await web.submit(items=b.items, user=b.user, plan=b.plan, kind=b.kind, priority=b.priority,
                             idempotency_key_field=b.idempotency_key_field)
    return json({"ids": batch.ids, "created": batch.created, "existing": batch.existing}, 202)


async def get_job(web: Web, request: Request) -> Response:
    return json(await web.run(web.q.job, path_int(request, "id")))


async def list_jobs(web: Web, request: Request) -> Response:
    q = request.query_params
    status = q.get("status") or None
    if status is not None and status not in STATUSES:
        raise HTTPProblem(400, "bad-input", f"status={status[:40]!r}: expected one of {', '.join(STATUSES)}",
                          where="status")
    page = await web.run(web.q.jobs, status=status, user=q.get("user") or None, kind=q.get("kind") or None,
                         limit=int_param(request, "limit", 50, 1, 1000),
                         cursor=int_param(request, "cursor", None, 1, 2**62))
    return json({"jobs": page.jobs, "cursor": page.cursor})


async def wait_job(web: Web, request: Request) -> Response:
    """Long poll: answers when the job is done, dead or cancelled, or at the timeout (its state then; 200 either
    way: `finished` says which; also when the server stops). Looks again only when something committed to the
    database. Stops as soon as its client goes away (a poll nobody waits for must not hold a place under
    max_connections); at most [http] max_waits at once."""
    job_id = path_int(request, "id")
    deadline = time.monotonic() + float_param(request, "timeout", 30.0, 0.0, WAIT_MAX_S)
    if web.waits >= web.http.max_waits:
        raise HTTPProblem(503, "too-many-waits", f"{web.waits} long polls wait already ([http] max_waits); poll "
                          "again later", {"Retry-After": "1"})
    web.waits += 1
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        pause = WAIT_STEP_S[0]
        while True:
            token = await web.run(web.q.change_token)
            job = await web.run(web.q.job, job_id)
            if job.status in FINISHED or time.monotonic() >= deadline or web.stopping:
                return json({"finished": job.status in FINISHED, "job": job})
            while time.monotonic() < deadline and not web.stopping:
                await asyncio.wait([gone], timeout=min(pause, max(0.0, deadline - time.monotonic())))
                if gone.done():
                    return Response(status_code=499)  # (nobody reads it)
                pause = min(pause * 2, WAIT_STEP_S[1])
                if await web.run(web.q.change_token) != token:
                    pause = WAIT_STEP_S[0]
                    break
    finally:
        web.waits -= 1
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (a GET's receive() says http.disconnect once its empty body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def retry_job(web: Web, request: Request) -> Response:
    return json({"ids": await web.run(web.q.retry, path_int(request, "id"))})


async def cancel_job(web: Web, request: Request) -> Response:
    was = await web.run(web.q.cancel, path_int(request, "id"))
    return json({"id": path_int(request, "id"), "was": was, "status": "cancelled"})


async def purge_jobs(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.Purge)
    n = await web.run(web.q.purge, b.older_than, statuses=tuple(b.statuses), dry_run=b.dry_run)
    return json({"purged" if not b.dry_run else "would_purge": n})


# ---- limits --------------------------------------------------------------------------------------------------------

async def get_limits(web: Web, request: Request) -> Response:
    return json(await web.run(web.q.limits))


async def put_limit(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.SetLimit)
    key = request.path_params["key"]
    value = await web.run(web.q.set_limit, key, b.value)
    return json({"key": key, "value": value, "source": "override"})


async def delete_limit(web: Web, request: Request) -> Response:
    key = request.path_params["key"]
    had = await web.run(web.q.unset_limit, key)
    limit = (await web.run(web.q.limits))[key]
    return json({"key": key, "had_override": had, "value": limit.value, "source": limit.source})


# ---- rate limits, gates, counters ----------------------------------------------------------------------------------

async def ratelimit_check(web: Web, request: Request) -> Response:
    """The decision, with the IETF RateLimit-Policy and RateLimit fields (draft-ietf-httpapi-ratelimit-headers):
    200 when allowed, 429 (and Retry-After) when not."""
    b = await web.body(request, schemas.RateCheck)
    d = await web.q.ratelimit.check_async(b.key, b.cost)  # on the loop: no thread hop (most of what it cost)
    name = "default" if d.policy in ("", "*") else d.policy.replace('"', "")
    headers = {"RateLimit-Policy": f'"{name}";q={d.limit};w={max(1, round(d.window_s))}',
               "RateLimit": f'"{name}";r={d.remaining};t={math.ceil(d.reset_after_s)}'}
    if not d.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(d.retry_after_s)))
    return json(d, 200 if d.allowed else 429, headers)


async def gate_acquire(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.Acquire)
    gate = request.path_params["name"]
    lease = await web.leases.acquire(gate, None if b.wait_ms is None else b.wait_ms / 1000, b.lease_s)
    return json({"permit": lease.id, "gate": gate, "lease_s": lease.lease_s})


async def gate_release(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.Release)
    web.leases.release(request.path_params["name"], b.permit, b.outcome)
    return json({"released": True})


async def gate_renew(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.Renew)
    return json({"permit": b.permit, "lease_s": web.leases.renew(request.path_params["name"], b.permit, b.lease_s)})


async def counter_incr(web: Web, request: Request) -> Response:
    b = await web.body(request, schemas.Incr)
    key = request.path_params["key"]
    return json({"key": key, "value": await web.run(web.q.counter.incr, key, b.n, op_id=b.op_id)})


async def counter_get(web: Web, request: Request) -> Response:
    key = request.path_params["key"]
    return json({"key": key, "value": await web.run(web.q.counter.get, key)})


# ---- traffic -------------------------------------------------------------------------------------------------------

async def post_events(web: Web, request: Request) -> Response:
    """One event or an array; 202 once committed by the path collector or stored in its durable inbox."""
    body = await web.body(request)
    events = body if isinstance(body, list) else [body]
    cap = web.http.max_events_per_request
    if len(events) > cap:
        raise HTTPProblem(413, "too-large", f"{len(events)} events: expected at most {cap} per request "
                          "([http] max_events_per_request)", max_events=cap)
    if not events:
        raise HTTPProblem(400, "bad-input", "an empty array: expected at least one event", where="body")
    return json(await web.record_events(events), 202)


def hour_param(request: Request) -> int:
    """?hour= as epoch seconds or "2026-12-02T05" (UTC); default: the current hour."""
    raw = request.query_params.get("hour")
    if not raw:
        return int(time.time() // 3600 * 3600)
    if raw.isascii() and raw.isdigit():
        if len(raw) > 11:  # (past year 5000: a typo, not an hour; and int() of 5,000 digits is refused)
            raise HTTPProblem(400, "bad-input", f"hour={raw[:40]!r}: expected epoch seconds (at most 11 digits)",
                              where="hour")
        return int(raw) // 3600 * 3600
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(raw if len(raw) > 13 else raw + ":00")
    except ValueError:
        raise HTTPProblem(400, "bad-input", f"hour={raw[:40]!r}: expected epoch seconds or an ISO hour such as "
                          '"2026-12-02T05" (UTC)', where="hour") from None
    return int(t.replace(tzinfo=t.tzinfo or dt.UTC).timestamp()) // 3600 * 3600


async def paths_top(web: Web, request: Request) -> Response:
    hour = hour_param(request)
    rows = await web.run(web.q.path_stats, hour=hour, limit=int_param(request, "limit", 20, 1, 1000))
    return json({"hour": hour, "paths": rows})


async def paths_stats(web: Web, request: Request) -> Response:
    path = request.query_params.get("path")
    if not path or not path.startswith("/"):
        raise HTTPProblem(400, "bad-input", "path: expected the (normalized) path, starting with /", where="path")
    hours = int_param(request, "hours", 24, 1, 24 * 366)
    rows = await web.run(web.q.path_stats, path=path, hours=hours, limit=hours)
    return json({"path": path, "hours": sorted(rows, key=lambda r: r["hour"])})


# ---- diagnostics ---------------------------------------------------------------------------------------------------

async def status(web: Web, request: Request) -> Response:
    top = int_param(request, "top", 10, 1, 100)
    data = await web.run(web.q.status, top=top)
    data["http"] = {"started_at": web.started_at, "gate_leases": web.leases.count(), "long_polls": web.waits}
    data["throughput"] = await web.run(web.q.throughput, minutes=60)  # the status page's chart
    return json(data)


async def diag_gates(web: Web, request: Request) -> Response:
    return json(await web.run(web.q.gate_stats, timeout_s=2.0))


async def selftest(web: Web, request: Request) -> Response:
    import cardq

    path = web.q.config.path
    checks = await web.run(cardq.selftest, str(path) if path else None)
    ok = all(c.ok for c in checks)
    return json({"ok": ok, "checks": checks}, 200 if ok else 503)


async def openapi(web: Web, request: Request) -> Response:
    from cardq.web.openapi import document

    return json(document(ROUTES))


# The status page runs only its own script and style, talks only to this server, and is never framed: data that
# slipped into markup could still run nothing (the page itself sets every value as text).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


async def page(web: Web, request: Request) -> Response:
    resp = _static("index.html", "text/html; charset=utf-8")
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


async def static_file(web: Web, request: Request) -> Response:
    name = request.path_params["name"]
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml"}
    suffix = Path(name).suffix
    if "/" in name or name.startswith(".") or suffix not in types:
        raise HTTPProblem(404, "not-found", f"no static file {name[:60]!r}")
    return _static(name, types[suffix])


def _static(name: str, media_type: str) -> Response:
    try:
        content = (STATIC / name).read_bytes()
    except OSError:
        raise HTTPProblem(404, "not-found", f"no static file {name!r} in this installation") from None
    return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache",
                                                             "X-Content-Type-Options": "nosniff"})


async def metrics(web: Web, request: Request) -> Response:
    from cardq.web.metrics import CONTENT_TYPE, render

    return Response(await web.run(render, web), media_type=CONTENT_TYPE)


# ---- the table -----------------------------------------------------------------------------------------------------

R, P = RouteSpec, Param
ROUTES: list[RouteSpec] = [
    R("GET", "/healthz", None, healthz, "The process answers (no token)"),
    R("GET", "/readyz", None, readyz, "Database writable, actors answering, every child up; else 503 naming the "
      "failing check (no token)", errors=(503,)),
    R("GET", "/metrics", "read", metrics, "Prometheus text format"),
    R("GET", "/openapi.json", None, openapi, "This document"),
    R("GET", "/", None, page, "The live status page (asks for a read token once)"),
    R("GET", "/static/{name}", None, static_file, "The status page's script and style"),
    R("POST", "/v1/jobs", "app", submit_jobs, "Submit a batch for one user, all or nothing", schemas.SubmitJobs,
      ok=202, errors=(400, 413, 429)),
    R("GET", "/v1/jobs", "read", list_jobs, "Jobs, newest first, without payloads; page on with cursor",
      params=(P("status", "string", "queued, scheduled, processing, done, dead or cancelled"),
              P("user", "string", "one user's"), P("kind", "string", "one kind's"),
              P("limit", "integer", "1 to 1000 (50)", lo=1, hi=1000),
              P("cursor", "integer", "the previous page's cursor", lo=1, hi=2**62))),
    R("GET", "/v1/jobs/{id}", "read", get_job, "One job, every field", errors=(404,)),
    R("GET", "/v1/jobs/{id}/wait", "read", wait_job, "Long poll until the job is done, dead or cancelled",
      params=(P("timeout", "number", "seconds, 0 to 300 (30)", lo=0, hi=WAIT_MAX_S),), errors=(404,)),
    R("POST", "/v1/jobs/{id}/retry", "admin", retry_job, "Queue a dead, cancelled or scheduled job again",
      errors=(404, 409)),
    R("POST", "/v1/jobs/{id}/cancel", "admin", cancel_job, "Cancel a queued, scheduled or processing job",
      errors=(404, 409)),
    R("POST", "/v1/jobs/purge", "admin", purge_jobs, "Delete finished jobs older than a duration", schemas.Purge),
    R("GET", "/v1/limits", "read", get_limits, "Every limit: value and source (override, config, default)"),
    R("PUT", "/v1/limits/{key}", "admin", put_limit, "Override a limit (the next submit applies it)",
      schemas.SetLimit),
    R("DELETE", "/v1/limits/{key}", "admin", delete_limit, "Back to the config.toml value"),
    R("POST", "/v1/ratelimit/check", "app", ratelimit_check, "Spend a key's rate limit if allowed (429 if not), "
      "with RateLimit-Policy and RateLimit header fields", schemas.RateCheck, errors=(429, 503)),
    R("POST", "/v1/gates/{name}/acquire", "app", gate_acquire, "A permit of a concurrency gate, as a lease",
      schemas.Acquire, errors=(503,)),
    R("POST", "/v1/gates/{name}/release", "app", gate_release, "Give a permit back (outcome teaches an adaptive "
      "gate)", schemas.Release),
    R("POST", "/v1/gates/{name}/renew", "app", gate_renew, "Extend a permit's lease", schemas.Renew),
    R("POST", "/v1/counters/{key}/incr", "app", counter_incr, "Add n (once per op_id)", schemas.Incr),
    R("GET", "/v1/counters/{key}", "read", counter_get, "A counter's value"),
    R("POST", "/v1/events", "app", post_events, "Record traffic events (one object or an array), idempotently",
      ok=202, errors=(400, 413, 503)),
    R("GET", "/v1/paths/top", "read", paths_top, "The hottest paths of an hour",
      params=(P("hour", "string", "epoch seconds or 2026-12-02T05 (UTC); default the current hour"),
              P("limit", "integer", "1 to 1000 (20)", lo=1, hi=1000))),
    R("GET", "/v1/paths/stats", "read", paths_stats, "One path, hour by hour: requests, 4xx/5xx, bytes, "
      "p50/p95/p99, unique clients",
      params=(P("path", "string", "the normalized path", required=True),
              P("hours", "integer", "1 to 8784 (24)", lo=1, hi=24 * 366))),
    R("GET", "/v1/status", "read", status, "What `cardq status --json` shows, with the HTTP server's own (http) "
      "and jobs finished per minute over the last hour (throughput)",
      params=(P("top", "integer", "busiest users shown (10)", lo=1, hi=100),)),
    R("GET", "/v1/diag/gates", "read", diag_gates, "Each gate: active, queued, dropped, waits, limits"),
    R("GET", "/v1/selftest", "read", selftest, "The checks of `cardq selftest` (503 if one fails)", errors=(503,)),
]

__all__ = ["ROUTES", "RouteSpec"]
