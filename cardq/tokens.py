"""Bearer tokens of the HTTP API: made here (random, shown once), kept in the store as SHA-256 digests.

A token is "cq_" and 43 characters of 32 random bytes: guessing one is hopeless, so a fast hash (not a slow
password hash) is the right digest, and a check costs one indexed read.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from cardq.errors import InputError
from cardq.store import Database
from cardq.store import tokens as store_tokens

PREFIX = "cq_"
MAX_NAME = 100


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(db: Database, scope: str, name: str = "") -> tuple[int, str, str, str]:
    """(id, token, scope, name) of a new token."""
    if scope not in store_tokens.SCOPES:
        raise InputError(f"scope {scope!r}: expected one of {', '.join(store_tokens.SCOPES)}", where="scope")
    if len(name) > MAX_NAME or any(not ch.isprintable() for ch in name):
        raise InputError(f"name {name[:40]!r}: expected at most {MAX_NAME} printable characters", where="name")
    token = PREFIX + secrets.token_urlsafe(32)
    token_id = store_tokens.add(db, name=name, scope=scope, digest=digest(token), now=time.time())
    return token_id, token, scope, name


def check(db: Database, token: str) -> tuple[int, str] | None:
    if not token.startswith(PREFIX) or len(token) > 100:
        return None
    return store_tokens.scope_of(db, digest(token))
