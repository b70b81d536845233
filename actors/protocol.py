"""Frames on the wire: orjson bytes only, never pickle.

Request: {"id": n, "op": "incr", "a": {...}} (an ask; "id" absent for a tell).
Answer:  {"id": n, "ok": true, "r": result} or {"id": n, "ok": false, "code": "...", "err": "one line"}.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import orjson

from cardq.errors import ActorError, ActorTimeout, ActorUnavailable, Overloaded

__all__ = ["ActorError", "ActorTimeout", "ActorUnavailable", "BadFrame", "Overloaded", "decode", "encode",
           "fingerprint", "shard_of"]


class BadFrame(Exception):
    pass


def combine(frames: list[bytes]) -> bytes:
    """Several encoded asks as one frame ({"m": [...]}): one write here, one read and one batch at the actor."""
    return frames[0] if len(frames) == 1 else b'{"m":[' + b",".join(frames) + b"]}"


def encode(msg: dict[str, Any]) -> bytes:
    return orjson.dumps(msg)


def decode(data: bytes) -> dict[str, Any]:
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadFrame(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise BadFrame("a frame must be a JSON object")
    return msg


def socket_path(run_dir: Path, actor: str, shard: int) -> Path:
    """Where an actor shard listens (mode 0600, in the run directory next to the key file)."""
    return run_dir / f"{actor}-{shard}.sock"


def shard_of(key: str, shards: int) -> int:
    """A key's shard: crc32, stable across processes and restarts (unlike Python's hash())."""
    return zlib.crc32(key.encode()) % shards if shards > 1 else 0


def fingerprint(actor: str, op: str, args: Any) -> str:
    """Identifies a message across retries and restarts (for dead-lettering poison messages)."""
    body = orjson.dumps([actor, op, args])  # a retry sends the same dict, keys in the same order
    return hashlib.blake2b(body, digest_size=6).hexdigest()  # 48 bits: fits exactly in the slot (a double)
