"""The Counter actor: named integer counters, exactly once.

incr(key, n, op_id), get(key), incr_if_below(key, n, limit, op_id) -> {ok, value}. An op_id already applied
gets the answer it got the first time and changes nothing (op ids are kept a day). State lives in SQLite only
(no cache), so the job store can move the same rows in its own transactions: `usage:<user>` is the job store's
per-user daily usage (see store/counters.py), the one number `cardq submit`, the workers and apps read and move.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from cardq.actors.server import SINGLE, Behaviour, Peer
from cardq.store import counters
from cardq.store.db import Tx

OP_RETENTION_S = 86400


class Incr(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    op_id: str
    n: int = 1


class Get(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class IncrIfBelow(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    n: int
    limit: int
    op_id: str


class Counter(Behaviour):
    name = "counter"
    ops = {"incr": (Incr, "incr"), "get": (Get, "get", SINGLE), "incr_if_below": (IncrIfBelow, "incr_if_below")}

    def incr(self, tx: Tx, peer: Peer, a: Incr, msg_id: int | None) -> int:
        now = time.time()
        return counters.incr(tx, a.key, a.n, a.op_id, day=self.db.days.key(now), now=now)

    def get(self, tx: Tx, peer: Peer, a: Get, msg_id: int | None) -> int:
        return counters.get(tx, a.key, day=self.db.days.key(time.time()))

    def incr_if_below(self, tx: Tx, peer: Peer, a: IncrIfBelow, msg_id: int | None) -> dict[str, Any]:
        now = time.time()
        ok, value = counters.incr_if_below(tx, a.key, a.n, a.limit, a.op_id, day=self.db.days.key(now), now=now)
        return {"ok": ok, "value": value}

    def tick(self, tx: Tx, now: float) -> list:
        counters.prune_ops(tx, now - OP_RETENTION_S)
        return []

    def next_tick(self, now: float) -> float:
        return now + 60.0
