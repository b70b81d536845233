"""The RateLimiter actor: GCRA rate limits per key, and concurrency gates (the old "AI queue").

Rate limits. Policy = limit per window_s, burst (how many may come at once; default = limit). GCRA with
emission interval T = window_s / limit keeps one number per key, its theoretical arrival time (TAT): a request
of cost c is allowed when max(TAT, now) + c*T - burst*T <= now. In any window of window_s seconds at most
limit + burst requests are allowed, and retry_after_s is exactly when the same request would be.

Gates. A permit is a slot lock (actors/gateslots.py): callers take a free one in their own process; this actor
keeps the queue for those that found none — up to max_queue acquirers wait (in order, up to queue_timeout_ms);
past that the answer is "overloaded" at once, the soft "we're overloaded, retry". For a queued caller the actor
takes a slot when one frees (it looks every few milliseconds while anyone waits) and holds it on the caller's
behalf; those permits are rows too, so they survive an actor restart, and one whose holder process has died is
released within a second.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from fnmatch import translate
from pathlib import Path
from typing import Annotated, Any

import msgspec

from cardq.actors import protocol
from cardq.actors.gatelimit import AdaptiveLimit, describe
from cardq.actors.gateslots import GateSlots
from cardq.actors.server import DEFER, SINGLE, Behaviour, Peer
from cardq.actors.telemetry import WAIT_BOUNDS
from cardq.config import GateConfig, LoadedConfig
from cardq.errors import ActorError
from cardq.store import gates as store_gates
from cardq.store import ratelimits
from cardq.store.db import Tx

REAP_EVERY_S = 1.0
SLOT_POLL_S = 0.005  # while callers wait: how often freed slots are looked for
IDLE_TICK_S = 30.0  # with no permit held and nobody waiting
WAIT_SAMPLES = 1000


class Check(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    cost: int = 1


PID_MAX = 4_194_304  # Linux's highest possible pid_max


class Acquire(msgspec.Struct, forbid_unknown_fields=True):
    gate: str
    permit: str
    pid: Annotated[int, msgspec.Meta(ge=1, le=PID_MAX)] | None = None  # ignored: the holder is the connection's
    wait_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None  # how long the caller will wait for an answer


class Release(msgspec.Struct, forbid_unknown_fields=True):
    """Give a permit back — or, if it is still waiting (its caller gave up), take it out of the queue."""

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
    """One GCRA decision: (answer, the key's TAT to keep). Pure, so its guarantees are property-tested."""
    t = p.interval
    # A key's TAT is never legitimately more than a full burst ahead; one that is was set before the wall clock
    # stepped back (NTP, a VM restored), and must not lock the key out for the length of that step.
    tat = now if tat is None or tat < now else min(tat, now + p.burst * t)
    new_tat = tat + cost * t
    allow_at = new_tat - p.burst * t
    if allow_at <= now + 1e-9:
        return {"allowed": True, "limit": p.limit, "remaining": int((now - allow_at) / t + 1e-9),
                "retry_after_s": 0.0, "reset_after_s": round(new_tat - now, 6)}, new_tat
    return {"allowed": False, "limit": p.limit, "remaining": 0, "retry_after_s": allow_at - now,
            "reset_after_s": round(tat - now, 6)}, tat  # unchanged, or pulled back to "full" after a step back


@dataclass
class Waiter:
    client: Peer
    msg_id: int | None
    permit: str
    pid: int
    since: float  # time.monotonic(), as is the deadline: a wall-clock step must not expire or prolong a wait
    deadline: float


@dataclass
class Gate:
    name: str
    cfg: GateConfig
    slots: GateSlots  # this actor's handles: the slots it holds for queued callers
    # permit -> (holder pid, its start, granted at, the slot held for it; None: none was free when the actor
    # restarted and took its permits back — over the limit until that holder releases)
    permits: dict[str, tuple[int, int, float, int | None]] = field(default_factory=dict)
    waiters: deque[Waiter] = field(default_factory=deque)
    queue_marked: bool = False  # do we hold the slots' queue lock (see GateSlots.queue_waiting)
    dropped: int = 0
    last_drop_at: float | None = None
    waits_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WAIT_SAMPLES))
    adaptive: AdaptiveLimit | None = None  # the shared limit of an adaptive gate (made on first use)

    def limit(self) -> int:
        """Permits allowed now: max_concurrency, or an adaptive gate's current limit."""
        if not self.cfg.adaptive:
            return self.cfg.max_concurrency
        if self.adaptive is None:
            self.adaptive = AdaptiveLimit.of_gate(self.slots.run_dir, self.name)
        try:
            return self.adaptive.current(self.cfg.min_concurrency, self.cfg.max_concurrency)
        except (OSError, ValueError):  # unreadable state (a full disk): the safe end, as the clients do
            return self.cfg.min_concurrency

    def stats(self) -> dict[str, Any]:
        waits = sorted(self.waits_ms)
        learned: dict[str, Any] = {}
        limit = self.limit()
        if self.cfg.adaptive and self.adaptive is not None:
            with contextlib.suppress(OSError, ValueError):
                learned = describe(self.adaptive.read(), self.cfg.min_concurrency, self.cfg.max_concurrency)
        return {
            "limit": limit, "adaptive": self.cfg.adaptive,
            "min_concurrency": self.cfg.min_concurrency if self.cfg.adaptive else self.cfg.max_concurrency,
            **learned,
            "active": self.slots.count_held(self.cfg.max_concurrency), "queued": len(self.waiters),
            "dropped_since_boot": self.dropped,
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
        self.tat: dict[str, float] = ratelimits.load_all(db)
        self.gates: dict[str, Gate] = {}
        self.answers: list[tuple[Peer, int, dict[str, Any]]] = []
        self.apply_config(loaded)
        # A gate renamed or removed from config.toml: its permits mean nothing any more.
        store_gates.remove_unknown(db, list(self.loaded.config.gates))
        self._sync_permits()  # a restarted actor takes the slots back for the permits it held
        self.next_reap = 0.0
        self.resized = False

    def apply_config(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        rl = loaded.config.ratelimit
        self.default = Policy("*", rl.default_limit, rl.default_window_s, rl.default_burst or rl.default_limit)
        policies = [Policy(p, v.limit, v.window_s, v.burst or v.limit) for p, v in rl.policies.items()]
        self.policies = [(re.compile(translate(p.pattern)), p) for p in sorted(policies, key=lambda p: -len(p.pattern))]
        self.config_digest = loaded.digest
        for name, cfg in loaded.config.gates.items():
            self._gate(name).cfg = cfg
        self.resized = True  # a larger max_concurrency admits waiters at the next tick

    def _gate(self, name: str) -> Gate:
        gate = self.gates.get(name)
        if gate is None:
            cfg = self.loaded.config.gates.get(name)
            if cfg is None:
                raise ActorError(f"unknown gate {name!r}; gates are: {', '.join(self.loaded.config.gates)} "
                                 "(add [gates.NAME] to config.toml)", "bad_request")
            gate = self.gates[name] = Gate(name, cfg, GateSlots(self.loaded.run_dir, name))
        return gate

    def policy_for(self, key: str) -> Policy:
        for regex, policy in self.policies:
            if regex.match(key):
                return policy
        return self.default

    # ---- rate limits ----------------------------------------------------------------------------------------

    def check(self, tx: Tx, client: Peer, a: Check, msg_id: int | None) -> dict[str, Any]:
        p = self.policy_for(a.key)
        if not 0 < a.cost <= p.burst:
            raise ActorError(f"cost {a.cost}: expected 1 to {p.burst} (the burst of policy {p.pattern!r})",
                             "bad_request")
        now = time.time()
        old = self.tat.get(a.key)
        answer, new_tat = gcra(old, now, a.cost, p)
        if new_tat != old and (answer["allowed"] or old is not None):  # a grant, or a TAT pulled back to "full"
            ratelimits.save(tx, a.key, new_tat)
            self.tat[a.key] = new_tat  # only once the write went through: memory never runs ahead of SQLite
        answer["policy"], answer["window_s"] = p.pattern, p.window_s  # (for the RateLimit-Policy header field)
        self.telemetry.count("ratelimit", p.pattern, "allowed" if answer["allowed"] else "denied")
        return answer

    # ---- gates ------------------------------------------------------------------------------------------------

    def acquire(self, tx: Tx, client: Peer, a: Acquire, msg_id: int | None) -> Any:
        gate = self._gate(a.gate)
        now = time.time()
        if a.permit in gate.permits:  # a retried acquire that was granted: the same answer again
            return {"permit": a.permit, "waited_ms": 0.0}
        if any(w.permit == a.permit for w in gate.waiters):
            for w in gate.waiters:
                if w.permit == a.permit:
                    w.client, w.msg_id = client, msg_id  # answer the retry, not the lost connection
            return DEFER
        if not gate.waiters and self._grant(tx, gate, a.permit, client.pid, 0.0):
            return {"permit": a.permit, "waited_ms": 0.0}
        if len(gate.waiters) < gate.cfg.max_queue:
            # Never wait longer than the caller will: a permit granted after it gave up would be held by no one.
            wait_s = gate.cfg.queue_timeout_ms / 1000
            if a.wait_ms is not None:
                wait_s = min(wait_s, a.wait_ms / 1000)
            mono = time.monotonic()
            gate.waiters.append(Waiter(client, msg_id, a.permit, client.pid, mono, mono + wait_s))
            self._mark_queue(gate)
            return DEFER
        gate.dropped += 1
        gate.last_drop_at = now
        raise ActorError(f"gate {gate.name} overloaded: {len(gate.permits)} running, {len(gate.waiters)} waiting "
                         f"(max_queue={gate.cfg.max_queue}); retry later", "overloaded")

    def release(self, tx: Tx, client: Peer, a: Release, msg_id: int | None) -> dict[str, Any]:
        gate = self._gate(a.gate)
        held = gate.permits.pop(a.permit, None)
        if held is not None:
            store_gates.remove(tx, a.permit)
            gate.slots.give(held[3])
            self._admit(tx, gate)
        else:
            gate.waiters = deque(w for w in gate.waiters if w.permit != a.permit)
            self._mark_queue(gate)
        return {"released": held is not None}

    def gate_stats(self, tx: Tx, client: Peer, a: Any, msg_id: int | None) -> dict[str, Any]:
        """The gates this shard serves (a gate lives on the shard its name hashes to)."""
        shards = self.loaded.config.actors.ratelimit_shards
        return {name: {**gate.stats(), "config": self.config_digest} for name, gate in self.gates.items()
                if protocol.shard_of(f"gate:{name}", shards) == self.shard}

    def more_stats(self) -> dict[str, Any]:
        """For the "stats" op: every configured gate this shard serves (active, queued, dropped, its limit), the
        ones nobody has used since this actor started too (their figures are zero, not missing)."""
        shards = self.loaded.config.actors.ratelimit_shards
        return {"gates": {name: self._gate(name).stats() for name in self.loaded.config.gates
                          if protocol.shard_of(f"gate:{name}", shards) == self.shard}}

    def _grant(self, tx: Tx, gate: Gate, permit: str, pid: int, waited_s: float) -> bool:
        """Take a free slot and hold it for `pid` as `permit`; False when every slot is held."""
        slot = gate.slots.try_take(gate.limit(), files=gate.cfg.max_concurrency)
        if slot is None:
            return False
        started, now = process_start(pid), time.time()
        store_gates.add(tx, store_gates.Permit(permit, gate.name, pid, started, now))
        gate.permits[permit] = (pid, started, now, slot)
        gate.waits_ms.append(waited_s * 1000)
        self.telemetry.observe(("gate_wait", gate.name), WAIT_BOUNDS, waited_s)
        return True

    def _admit(self, tx: Tx, gate: Gate) -> None:
        """Grant the waiters at the head of the queue the slots that are free now."""
        mono = time.monotonic()
        self._expire(gate, mono)  # never grant to a waiter whose caller has given up
        while gate.waiters and self._grant(tx, gate, gate.waiters[0].permit, gate.waiters[0].pid,
                                           mono - gate.waiters[0].since):
            w = gate.waiters.popleft()
            if w.msg_id is not None:
                self.answers.append((w.client, w.msg_id, {"ok": True, "r": {
                    "permit": w.permit, "waited_ms": round((mono - w.since) * 1000, 3)}}))
        self._mark_queue(gate)

    def _mark_queue(self, gate: Gate) -> None:
        """Hold the gate's queue lock exactly while callers wait, so that newcomers queue behind them rather
        than take a freed slot first. (Taking it may fail for an instant: tried again at the next tick.)"""
        want = bool(gate.waiters)
        if want != gate.queue_marked and gate.slots.mark_queue(want):
            gate.queue_marked = want

    def _expire(self, gate: Gate, mono: float) -> None:
        """Answer every waiter whose time is up (wherever it stands in the queue; `mono` is time.monotonic())
        and take it out."""
        if not any(w.deadline <= mono for w in gate.waiters):
            return
        keep = deque()
        for w in gate.waiters:
            if w.deadline > mono:
                keep.append(w)
                continue
            gate.dropped += 1
            gate.last_drop_at = time.time()
            if w.msg_id is not None:
                self.answers.append((w.client, w.msg_id, {"ok": False, "code": "overloaded", "err": (
                    f"gate {gate.name}: no permit within {round((w.deadline - w.since) * 1000)} ms; retry later")}))
        gate.waiters = keep

    def tick(self, tx: Tx, now: float) -> list[tuple[Peer, int, dict[str, Any]]]:
        for gate in self.gates.values():
            if gate.waiters or self.resized or gate.queue_marked:
                self._admit(tx, gate)  # a slot freed by a holder in another process: the next waiter's
        self.resized = False
        if now >= self.next_reap:
            self.next_reap = now + REAP_EVERY_S
            self._reap(tx, now)
            stale = [k for k, tat in self.tat.items() if tat < now]
            if len(stale) > 10_000:  # fully reset keys: forget them (a missing key means "fresh")
                for k in stale:
                    del self.tat[k]
                ratelimits.forget_reset(tx, now)
        answers, self.answers = self.answers, []
        return answers

    def drain_answers(self) -> list[tuple[Peer, int, dict[str, Any]]]:
        answers, self.answers = self.answers, []
        return answers

    def _reap(self, tx: Tx, now: float) -> None:
        """Release permits whose holder process is gone."""
        for gate in self.gates.values():
            dead = [p for p, (pid, started, _, _) in gate.permits.items() if not holder_alive(pid, started)]
            for permit in dead:
                gate.slots.give(gate.permits.pop(permit)[3])
                store_gates.remove(tx, permit)
                self.log.warning("gate.permit_reaped", gate=gate.name, permit=permit)
            if dead:
                self._admit(tx, gate)

    def on_tick_failed(self) -> None:
        """Bring the gates' permits back in line with SQLite (the tick's grants and releases were rolled back).
        Grants it had answered are not sent: a caller told "granted" would run with no slot held. (A waiter taken
        off the queue by it hears nothing; its client's deadline ends its wait, and its release is harmless.)"""
        self.answers = []
        self._sync_permits()

    def _sync_permits(self) -> None:
        """Permits as SQLite has them: one held in memory but not stored gives its slot back; one stored but not
        held (an actor restarted, or a release rolled back) takes a slot again."""
        stored = {p.permit_id: p for p in store_gates.permits(self.db)}
        for gate in self.gates.values():
            for permit in [p for p in gate.permits if p not in stored]:
                gate.slots.give(gate.permits.pop(permit)[3])
        shards = self.loaded.config.actors.ratelimit_shards
        for p in stored.values():
            if p.gate not in self.loaded.config.gates or protocol.shard_of(f"gate:{p.gate}", shards) != self.shard:
                continue  # another shard's gate: that shard holds its slots and answers its releases
            gate = self._gate(p.gate)
            if p.permit_id not in gate.permits:
                slot = gate.slots.try_take(gate.cfg.max_concurrency)
                gate.permits[p.permit_id] = (p.pid, p.pid_started, p.acquired_at, slot)

    def on_store_failed(self) -> list[tuple[Peer, int]]:
        """Permits, rate-limit state and the queue as SQLite has them: the failed transaction's grants, releases
        and check results never happened. Waiters are dropped (told "unavailable"): their asks may have been in
        it, and a grant to them could not be stored anyway."""
        self.on_tick_failed()
        self.tat = ratelimits.load_all(self.db)
        self.answers = []
        dropped = [(w.client, w.msg_id) for g in self.gates.values() for w in g.waiters if w.msg_id is not None]
        for gate in self.gates.values():
            gate.waiters.clear()
            self._mark_queue(gate)
        return dropped

    def on_disconnect(self, client: Peer) -> None:
        for gate in self.gates.values():
            gate.waiters = deque(w for w in gate.waiters if w.client is not client)
            self._mark_queue(gate)
        self.next_reap = 0.0  # if it died, its permits go at the next tick

    def next_tick(self, now: float) -> float:
        # While anyone waits, look for freed slots every SLOT_POLL_S (a holder in another process gives its slot
        # back without telling us); and never sleep past a waiter's deadline, which is monotonic: as wall time.
        mono = time.monotonic()
        deadlines = [now + min(w.deadline for w in g.waiters) - mono for g in self.gates.values() if g.waiters]
        if deadlines or any(g.queue_marked for g in self.gates.values()):
            deadlines.append(now + SLOT_POLL_S)
        # Holders to watch (permits this actor holds for callers, reaped within REAP_EVERY_S of their death), or
        # nothing: then only the forgetting of old rate-limit keys, now and then.
        watching = any(g.permits for g in self.gates.values())
        return min([now + (REAP_EVERY_S if watching else IDLE_TICK_S), *deadlines])


def process_start(pid: int) -> int:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22); 0 if it is not running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError, OverflowError):
        return 0
    return 0 if fields[0] in ("Z", "X") else int(fields[19])


def holder_alive(pid: int, started: int) -> bool:
    """Is the process that took the permit still running? A dead one, a zombie, or a new process that reuses
    its pid (after a reboot, say) is not."""
    return started != 0 and process_start(pid) == started
