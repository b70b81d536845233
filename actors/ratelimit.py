"""The RateLimiter actor: GCRA rate limits per key, and concurrency gates (the old "AI queue").

Rate limits. Policy = limit per window_s, burst (how many may come at once; default = limit). GCRA with
emission interval T = window_s / limit keeps one number per key, its theoretical arrival time (TAT): a request
of cost c is allowed when max(TAT, now) + c*T - burst*T <= now. In any window of window_s seconds at most
limit + burst requests are allowed, and retry_after_s is exactly when the same request would be.

Gates. At most max_concurrency permits at once; up to max_queue acquirers wait (in order, up to
queue_timeout_ms); past that the answer is "overloaded" at once — the soft "we're overloaded, retry". Permits
are rows, so they survive an actor restart; a permit whose holder process has died is released within a second.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from fnmatch import translate
from pathlib import Path
from typing import Any

import apsw
import msgspec

from actors import protocol
from actors.protocol import ActorError
from actors.server import DEFER, SINGLE, Behaviour, Client
from cardq.config import GateConfig, LoadedConfig

REAP_EVERY_S = 1.0
WAIT_SAMPLES = 1000


class Check(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    cost: int = 1


class Acquire(msgspec.Struct, forbid_unknown_fields=True):
    gate: str
    permit: str
    pid: int


class Release(msgspec.Struct, forbid_unknown_fields=True):
    gate: str
    permit: str


@dataclass(frozen=True)
class Policy:
    pattern: str
    limit: int
    window_s: float
    burst: int

    @property
    def interval(self) -> float:
        return self.window_s / self.limit


def gcra(tat: float | None, now: float, cost: int, p: Policy) -> tuple[dict[str, Any], float]:
    """One GCRA decision: (answer, the key's TAT if allowed). Pure, so its guarantees are property-tested."""
    t = p.interval
    tat = now if tat is None or tat < now else tat
    new_tat = tat + cost * t
    allow_at = new_tat - p.burst * t
    if allow_at <= now + 1e-9:
        return {"allowed": True, "limit": p.limit, "remaining": int((now - allow_at) / t + 1e-9),
                "retry_after_s": 0.0, "reset_after_s": round(new_tat - now, 6)}, new_tat
    return {"allowed": False, "limit": p.limit, "remaining": 0, "retry_after_s": allow_at - now,
            "reset_after_s": round(tat - now, 6)}, tat


@dataclass
class Waiter:
    client: Client
    msg_id: int | None
    permit: str
    pid: int
    since: float
    deadline: float


@dataclass
class Gate:
    name: str
    cfg: GateConfig
    permits: dict[str, tuple[int, float]] = field(default_factory=dict)  # permit -> (pid, acquired_at)
    waiters: deque[Waiter] = field(default_factory=deque)
    dropped: int = 0
    last_drop_at: float | None = None
    waits_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))

    def stats(self) -> dict[str, Any]:
        waits = sorted(self.waits_ms)
        return {
            "active": len(self.permits), "queued": len(self.waiters), "dropped_since_boot": self.dropped,
            "avg_wait_ms": round(sum(waits) / len(waits), 3) if waits else 0.0,
            "p95_wait_ms": round(waits[max(0, math.ceil(0.95 * len(waits)) - 1)], 3) if waits else 0.0,
            "last_drop_at": self.last_drop_at, "max_concurrency": self.cfg.max_concurrency,
            "max_queue": self.cfg.max_queue, "queue_timeout_ms": self.cfg.queue_timeout_ms,
        }


class RateLimiter(Behaviour):
    name = "ratelimit"
    ops = {"check": (Check, "check", SINGLE), "acquire": (Acquire, "acquire"), "release": (Release, "release"),
           "gate_stats": (None, "gate_stats", SINGLE)}

    def __init__(self, loaded: LoadedConfig, db: Any, shard: int):
        super().__init__(loaded, db, shard)
        self.tat: dict[str, float] = dict(db.conn.execute("SELECT key, tat FROM rate_limits").fetchall())
        self.gates: dict[str, Gate] = {}
        self.answers: list[tuple[Client, int, dict[str, Any]]] = []
        self.apply_config(loaded)
        for permit, gate, pid, at in db.conn.execute("SELECT permit_id, gate, pid, acquired_at FROM gate_permits"):
            self._gate(gate).permits[permit] = (pid, at)
        self.next_reap = 0.0

    def apply_config(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        rl = loaded.config.ratelimit
        self.default = Policy("*", rl.default_limit, rl.default_window_s, rl.default_burst or rl.default_limit)
        policies = [Policy(p, v.limit, v.window_s, v.burst or v.limit) for p, v in rl.policies.items()]
        self.policies = [(re.compile(translate(p.pattern)), p) for p in sorted(policies, key=lambda p: -len(p.pattern))]
        self.config_digest = loaded.digest
        for name, cfg in loaded.config.gates.items():
            self._gate(name).cfg = cfg

    def _gate(self, name: str) -> Gate:
        gate = self.gates.get(name)
        if gate is None:
            cfg = self.loaded.config.gates.get(name)
            if cfg is None:
                raise ActorError(f"unknown gate {name!r}; gates are: {', '.join(self.loaded.config.gates)} "
                                 "(add [gates.NAME] to config.toml)", "bad_request")
            gate = self.gates[name] = Gate(name, cfg)
        return gate

    def policy_for(self, key: str) -> Policy:
        for regex, policy in self.policies:
            if regex.match(key):
                return policy
        return self.default

    # ---- rate limits ----------------------------------------------------------------------------------------

    def check(self, c: apsw.Connection, client: Client, a: Check, msg_id: int | None) -> dict[str, Any]:
        p = self.policy_for(a.key)
        if not 0 < a.cost <= p.burst:
            raise ActorError(f"cost {a.cost}: expected 1 to {p.burst} (the burst of policy {p.pattern!r})",
                             "bad_request")
        now = time.time()
        answer, new_tat = gcra(self.tat.get(a.key), now, a.cost, p)
        if answer["allowed"]:
            c.execute("INSERT INTO rate_limits (key, tat) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
                      " tat = excluded.tat", (a.key, new_tat))
            self.tat[a.key] = new_tat  # only once the write went through: memory never runs ahead of SQLite
        return answer

    # ---- gates ------------------------------------------------------------------------------------------------

    def acquire(self, c: apsw.Connection, client: Client, a: Acquire, msg_id: int | None) -> Any:
        gate = self._gate(a.gate)
        now = time.time()
        if a.permit in gate.permits:  # a retried acquire that was granted: the same answer again
            return {"permit": a.permit, "waited_ms": 0.0}
        if any(w.permit == a.permit for w in gate.waiters):
            for w in gate.waiters:
                if w.permit == a.permit:
                    w.client, w.msg_id = client, msg_id  # answer the retry, not the lost connection
            return DEFER
        if len(gate.permits) < gate.cfg.max_concurrency and not gate.waiters:
            self._grant(c, gate, a.permit, a.pid, now, now)
            return {"permit": a.permit, "waited_ms": 0.0}
        if len(gate.waiters) < gate.cfg.max_queue:
            gate.waiters.append(Waiter(client, msg_id, a.permit, a.pid, now, now + gate.cfg.queue_timeout_ms / 1000))
            return DEFER
        gate.dropped += 1
        gate.last_drop_at = now
        raise ActorError(f"gate {gate.name} overloaded: {len(gate.permits)} running, {len(gate.waiters)} waiting "
                         f"(max_queue={gate.cfg.max_queue}); retry later", "overloaded")

    def release(self, c: apsw.Connection, client: Client, a: Release, msg_id: int | None) -> dict[str, Any]:
        gate = self._gate(a.gate)
        held = gate.permits.pop(a.permit, None) is not None
        if held:
            c.execute("DELETE FROM gate_permits WHERE permit_id = ?", (a.permit,))
            self._admit(c, gate, time.time())
        return {"released": held}

    def gate_stats(self, c: apsw.Connection, client: Client, a: Any, msg_id: int | None) -> dict[str, Any]:
        """The gates this shard serves (a gate lives on the shard its name hashes to)."""
        shards = self.loaded.config.actors.ratelimit_shards
        return {name: {**gate.stats(), "config": self.config_digest} for name, gate in self.gates.items()
                if protocol.shard_of(f"gate:{name}", shards) == self.shard}

    def _grant(self, c: apsw.Connection, gate: Gate, permit: str, pid: int, since: float, now: float) -> None:
        c.execute("INSERT INTO gate_permits (permit_id, gate, pid, acquired_at) VALUES (?, ?, ?, ?)",
                  (permit, gate.name, pid, now))
        gate.permits[permit] = (pid, now)
        gate.waits_ms.append((now - since) * 1000)

    def _admit(self, c: apsw.Connection, gate: Gate, now: float) -> None:
        while gate.waiters and len(gate.permits) < gate.cfg.max_concurrency:
            w = gate.waiters.popleft()
            self._grant(c, gate, w.permit, w.pid, w.since, now)
            if w.msg_id is not None:
                self.answers.append((w.client, w.msg_id, {"ok": True, "r": {
                    "permit": w.permit, "waited_ms": round((now - w.since) * 1000, 3)}}))

    def tick(self, c: apsw.Connection, now: float) -> list[tuple[Client, int, dict[str, Any]]]:
        for gate in self.gates.values():
            while gate.waiters and gate.waiters[0].deadline <= now:
                w = gate.waiters.popleft()
                gate.dropped += 1
                gate.last_drop_at = now
                if w.msg_id is not None:
                    self.answers.append((w.client, w.msg_id, {"ok": False, "code": "overloaded", "err": (
                        f"gate {gate.name}: no permit within queue_timeout_ms={gate.cfg.queue_timeout_ms}; retry "
                        "later")}))
            gate.waiters = deque(w for w in gate.waiters if w.deadline > now)
        if now >= self.next_reap:
            self.next_reap = now + REAP_EVERY_S
            self._reap(c, now)
            stale = [k for k, tat in self.tat.items() if tat < now]
            if len(stale) > 10_000:  # fully reset keys: forget them (a missing key means "fresh")
                for k in stale:
                    del self.tat[k]
                c.execute("DELETE FROM rate_limits WHERE tat < ?", (now,))
        answers, self.answers = self.answers, []
        return answers

    def drain_answers(self) -> list[tuple[Client, int, dict[str, Any]]]:
        answers, self.answers = self.answers, []
        return answers

    def pending_ticks(self) -> bool:
        return any(g.waiters for g in self.gates.values())

    def _reap(self, c: apsw.Connection, now: float) -> None:
        """Release permits whose holder process is gone."""
        for gate in self.gates.values():
            dead = [p for p, (pid, _) in gate.permits.items() if not _alive(pid)]
            for permit in dead:
                del gate.permits[permit]
                c.execute("DELETE FROM gate_permits WHERE permit_id = ?", (permit,))
                self.log.warning("gate.permit_reaped", gate=gate.name, permit=permit)
            if dead:
                self._admit(c, gate, now)

    def on_disconnect(self, client: Client) -> None:
        for gate in self.gates.values():
            gate.waiters = deque(w for w in gate.waiters if w.client is not client)
        if not _alive(client.pid):
            self.next_reap = 0.0  # its permits go at the next tick

    def next_tick(self, now: float) -> float:
        deadlines = [g.waiters[0].deadline for g in self.gates.values() if g.waiters]
        return min([now + REAP_EVERY_S, *deadlines]) if deadlines else now + REAP_EVERY_S


def _alive(pid: int) -> bool:
    """Is the process running? (A zombie — dead, not yet reaped by its parent — is not.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
