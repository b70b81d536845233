"""Errors as HTTP answers: RFC 9457 problem details (application/problem+json), one table from error type to
status, and the headers a client acts on (Retry-After)."""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from starlette.responses import Response

from cardq.errors import (
    ActorTimeout,
    ActorUnavailable,
    Error,
    InputError,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    LimitExceeded,
    Overloaded,
    StoreBusy,
    StoreError,
    StoreUnwritable,
)

PROBLEM_TYPE = "https://cardq.dev/problems/"  # + a slug; documented in the README's HTTP section

# Most specific first: the first type an error is an instance of decides.
STATUS_OF: list[tuple[type[Error], int, str]] = [
    (InputError, 400, "bad-input"),
    (InvalidRequest, 400, "bad-input"),
    (JobNotFound, 404, "not-found"),
    (InvalidTransition, 409, "invalid-transition"),
    (LimitExceeded, 429, "limit-exceeded"),
    (Overloaded, 503, "overloaded"),
    (ActorTimeout, 503, "actor-timeout"),
    (ActorUnavailable, 503, "actor-unavailable"),
    (StoreBusy, 503, "database-busy"),
    (StoreUnwritable, 503, "database-unwritable"),
    (StoreError, 500, "database-error"),
]


class HTTPProblem(Exception):
    """An answer other than success, raised anywhere in a request's handling."""

    def __init__(self, status: int, slug: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.slug, self.detail, self.headers, self.extra = status, slug, detail, headers or {}, extra


def from_error(e: Error) -> HTTPProblem:
    status, slug = next(((st, sl) for typ, st, sl in STATUS_OF if isinstance(e, typ)), (500, "error"))
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(e, InputError) and e.where:
        extra["where"] = e.where
        if e.index is not None:
            extra["index"] = e.index
    if isinstance(e, LimitExceeded):
        extra.update(limit=e.limit, allowed=e.allowed, current=e.current, requested=e.requested)
        if e.resets_at is not None:
            extra["resets_at"] = e.resets_at
            headers["Retry-After"] = str(max(1, math.ceil(e.resets_at - time.time())))
    if status == 503:
        headers.setdefault("Retry-After", "1")
    if isinstance(e, JobNotFound):
        extra["job_id"] = e.job_id
    return HTTPProblem(status, slug, str(e), headers, **extra)


TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
          408: "Request Timeout",
          409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
          500: "Internal Server Error", 503: "Service Unavailable"}


def response(p: HTTPProblem, request_id: str, instance: str) -> Response:
    body = {"type": PROBLEM_TYPE + p.slug, "title": TITLES.get(p.status, "Error"), "status": p.status,
            "detail": p.detail, "instance": instance, "request_id": request_id, **p.extra}
    return Response(orjson.dumps(body), status_code=p.status, media_type="application/problem+json",
                    headers={**p.headers, "X-Request-Id": request_id})
