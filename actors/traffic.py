"""Traffic events, shared by the recorder (client side) and the PathCollector (actor side).

An event's id is "<ts_ms, 13 digits>-<first 8 hex of sha256(client_ip:path:request_id)>" (the old gateway's
idempotent id): the same request recorded twice gets the same id and is counted once. The client IP never
leaves the recording process raw: it is replaced by a keyed hash (see actors/keys.py) before buffering.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from typing import Any

from cardq.errors import InputError

ID_RE = re.compile(r"^\d{13}-[0-9a-f]{8}$")
MAX_PATH = 1024
OTHER = "(other)"


def event_id(ts_ms: int, client_ip: str, path: str, request_id: str) -> str:
    digest = hashlib.sha256(f"{client_ip}:{path}:{request_id}".encode()).hexdigest()[:8]
    return f"{ts_ms:013d}-{digest}"


class PathNormalizer:
    """Query string and fragment dropped; each segment matching an id rule replaced (/cards/123 -> /cards/:id)."""

    def __init__(self, rules: list[list[str]]):
        self.rules = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def __call__(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0] or "/"
        segments = []
        for seg in path.split("/"):
            for regex, replacement in self.rules:
                if regex.match(seg):
                    seg = replacement
                    break
            segments.append(seg)
        out = "/".join(segments)
        if not out.startswith("/"):
            out = "/" + out
        return out[:MAX_PATH]


def make_event(*, path: str, status: int, response_ms: float, method: str = "GET", client_ip: str = "",
               request_id: str = "", ts_ms: int | None = None, bytes: int | None = None,  # noqa: A002
               idempotent_id: str | None = None, normalize: Callable[[str], str],
               hash_ip: Callable[[str], str]) -> dict[str, Any]:
    """The wire form of one event; InputError naming the field when it cannot be one."""
    if ts_ms is None:
        ts_ms = int(time.time() * 1000)
    if not isinstance(path, str) or not path.startswith("/"):
        raise InputError(f"path {path!r}: expected a path starting with /")
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise InputError(f"status {status!r}: expected an HTTP status from 100 to 599")
    if isinstance(response_ms, bool) or not isinstance(response_ms, int | float) \
            or not math.isfinite(response_ms) or not 0 <= response_ms < 1e9:
        raise InputError(f"response_ms {response_ms!r}: expected a finite duration >= 0 in milliseconds")
    if bytes is not None and (isinstance(bytes, bool) or not isinstance(bytes, int) or not 0 <= bytes < 2**62):
        raise InputError(f"bytes {bytes!r}: expected a whole number of bytes >= 0 (or none)")
    for name, value in (("client_ip", client_ip), ("request_id", request_id), ("method", method)):
        if not isinstance(value, str) or len(value) > 256:
            raise InputError(f"{name} {value!r}: expected text of at most 256 characters")
    if not isinstance(ts_ms, int) or not 10**12 <= ts_ms < 10**13:
        raise InputError(f"ts_ms {ts_ms!r}: expected epoch milliseconds (13 digits)")
    if idempotent_id is None:
        idempotent_id = event_id(ts_ms, client_ip, path, request_id)
    elif not isinstance(idempotent_id, str) or not ID_RE.match(idempotent_id):
        raise InputError(f"idempotent_id {idempotent_id!r}: expected <13-digit ts_ms>-<8 lowercase hex>")
    return {"id": idempotent_id, "ts_ms": ts_ms, "path": normalize(path), "method": str(method).upper()[:16],
            "status": status, "response_ms": float(response_ms), "client": hash_ip(client_ip),
            "bytes": bytes}
