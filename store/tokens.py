"""Bearer tokens of the HTTP API: a name, a scope and the SHA-256 digest of the token (never the token).

Revoking keeps the row (with revoked_at), so `cardq token list` can still say which token a log line's id was.
"""

from __future__ import annotations

from typing import NamedTuple

from cardq.store.db import Database

SCOPES = ("read", "app", "admin")


class TokenRow(NamedTuple):
    id: int
    name: str
    scope: str
    created_at: float
    revoked_at: float | None


def add(db: Database, *, name: str, scope: str, digest: str, now: float) -> int:
    """Store a new token's digest; its id. Atomic: one insert."""
    return db.write(lambda c: c.execute(
        "INSERT INTO api_tokens (name, scope, digest, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        (name, scope, digest, now)).fetchall()[0][0], "token add")


def scope_of(db: Database, digest: str) -> tuple[int, str] | None:
    """(id, scope) of the live token with this digest; None if there is none or it was revoked."""
    rows = db.read(lambda c: c.execute(
        "SELECT id, scope FROM api_tokens WHERE digest = ? AND revoked_at IS NULL", (digest,)).fetchall(),
        "token check")
    return (rows[0][0], rows[0][1]) if rows else None


def list_all(db: Database) -> list[TokenRow]:
    """Every token, live or revoked, oldest first (never a digest: nothing above the store needs one)."""
    return db.read(lambda c: [TokenRow(*r) for r in c.execute(
        "SELECT id, name, scope, created_at, revoked_at FROM api_tokens ORDER BY id")], "token list")


def revoke(db: Database, token_id: int, *, now: float) -> bool:
    """Revoke a live token; whether there was one with this id."""
    def tx(c):
        c.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id))
        return c.changes() > 0

    return db.write(tx, "token revoke")
