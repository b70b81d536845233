"""What each endpoint takes: msgspec Structs, strict (no "5" for 5) and closed (an unknown field is refused,
naming it). The same types make the request-body schemas of /openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from cardq.vocabulary import MAX_PRIORITY

Key = Annotated[str, Meta(min_length=1, max_length=256)]
OpId = Annotated[str, Meta(min_length=1, max_length=128)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class SubmitJobs(_Body):
    user: Annotated[str, Meta(min_length=1, max_length=256)]
    plan: Annotated[str, Meta(min_length=1, max_length=64)]
    items: list[dict[str, Any]]
    kind: Annotated[str, Meta(min_length=1, max_length=64)] = "card"
    priority: Annotated[int, Meta(ge=0, le=MAX_PRIORITY)] = 0
    idempotency_key_field: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class SetLimit(_Body):
    value: int


class RateCheck(_Body):
    key: Key
    cost: Annotated[int, Meta(ge=1, le=1_000_000)] = 1


class Acquire(_Body):
    wait_ms: Annotated[int, Meta(ge=0, le=3_600_000)] | None = None  # None: the gate's queue_timeout_ms
    lease_s: Annotated[float, Meta(gt=0, le=86_400)] | None = None  # None: [http] gate_lease_s


class Release(_Body):
    permit: Annotated[str, Meta(min_length=1, max_length=128)]
    # How the work under the permit went, for an adaptive gate: "overload" (the upstream said 429/503 or timed
    # out) cuts its limit, "ok" lets it grow, "error" (a failure of the caller's own) does neither.
    outcome: Literal["ok", "overload", "error"] = "ok"


class Renew(_Body):
    permit: Annotated[str, Meta(min_length=1, max_length=128)]
    lease_s: Annotated[float, Meta(gt=0, le=86_400)] | None = None


class Incr(_Body):
    n: Annotated[int, Meta(ge=-(2**53), le=2**53)] = 1
    op_id: OpId | None = None  # give one to make a retry apply once


class Purge(_Body):
    older_than: Annotated[str, Meta(min_length=1, max_length=32)]  # "7d", "12h", seconds
    statuses: list[Literal["done", "dead", "cancelled"]] = msgspec.field(default_factory=lambda: ["done"])
    dry_run: bool = False


BODIES: dict[str, type[msgspec.Struct]] = {t.__name__: t for t in (SubmitJobs, SetLimit, RateCheck, Acquire, Release,
                                                                      Renew, Incr, Purge)}
