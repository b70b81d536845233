"""Gate permits held over HTTP: leases.

An HTTP caller has no process for cardq to watch, so the HTTP server holds the permit for it — in a thread of its
own, inside `Queue.gate()`, exactly as an app's thread would — and gives it back when the caller releases it,
or when the lease runs out unrenewed (a caller that crashed or lost the network). If the server process dies, its
permits come back with it (they are kernel locks, or held by the actor for this pid). The caller gets a random
lease id, not the permit's name: nobody can release someone else's permit by guessing.

One pool thread per lease, waiting or held: gates are small (a handful of permits, tens of waiters), and a
thread that only waits on an Event costs no CPU. max_gate_leases bounds them.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cardq.errors import Error, InputError, Overloaded

ANSWER_GRACE_S = 2.0


class OverloadReported(Exception):
    """The caller released with outcome "overload": an adaptive gate cuts its limit (gatelimit reads .overload)."""

    overload = True


class CallerError(Exception):
    """Released with outcome "error", abandoned, or expired: neither growth nor a cut for an adaptive gate."""


@dataclass
class Lease:
    id: str
    gate: str
    lease_s: float
    expires_at: float = 0.0  # time.monotonic()
    permit: str | None = None
    abandoned: bool = False  # the caller stopped waiting before the permit came
    outcome: str = "ok"
    released: threading.Event = field(default_factory=threading.Event)


class GateLeases:
    def __init__(self, q: Any, *, max_leases: int, default_lease_s: float, log: Any):
        self.q, self.max_leases, self.default_lease_s, self.log = q, max_leases, default_lease_s, log
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        # Holders are pool threads, reused: each thread keeps its own database and actor connections (the Queue's
        # per-thread state), so a thread per lease would open and drop them for every acquire.
        self.pool = ThreadPoolExecutor(max_leases, thread_name_prefix="cardq-lease")
        self.expired = 0  # leases that ran out unrenewed (a caller that vanished)

    def count(self) -> int:
        return len(self._leases)

    async def acquire(self, gate: str, wait_s: float | None, lease_s: float | None) -> Lease:
        """A permit of `gate`, within wait_s (None: the gate's own queue timeout); Overloaded if none came."""
        lease = Lease(secrets.token_urlsafe(16), gate, lease_s or self.default_lease_s)
        with self._lock:
            if len(self._leases) >= self.max_leases:
                raise Overloaded(f"gate {gate!r}: {self.max_leases} HTTP leases held or waiting already "
                                 "([http] max_gate_leases); retry later")
            self._leases[lease.id] = lease
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[BaseException | None] = loop.create_future()

        def tell(outcome: BaseException | None) -> None:
            if not granted.done():
                granted.set_result(outcome)

        self.pool.submit(self._hold, lease, wait_s, loop, tell)
        try:
            # The holder's own wait is bounded (by wait_s at the actor): its answer normally comes first.
            error = await asyncio.wait_for(asyncio.shield(granted), None if wait_s is None else wait_s + ANSWER_GRACE_S)
        except BaseException as e:  # no permit in time, or the request itself was cancelled (client gone)
            lease.abandoned, lease.outcome = True, "error"  # the holder gives the permit straight back if it comes
            lease.released.set()
            if isinstance(e, TimeoutError):
                raise Overloaded(f"gate {gate!r}: no permit within {wait_s * 1000:.0f} ms; retry later") from None
            raise
        if error is not None:
            raise error
        return lease

    def _hold(self, lease: Lease, wait_s: float | None, loop: asyncio.AbstractEventLoop, tell: Any) -> None:
        try:
            # The actor keeps the wait in its queue no longer than the caller's: an abandoned wait must not hold
            # a place in the queue that the next caller needs.
            with self.q.gate(lease.gate, wait_s=wait_s) as permit:
                lease.permit = permit
                lease.expires_at = time.monotonic() + lease.lease_s
                loop.call_soon_threadsafe(tell, None)
                if lease.abandoned:
                    raise CallerError("abandoned")
                while not lease.released.wait(max(0.0, lease.expires_at - time.monotonic())):
                    if time.monotonic() >= lease.expires_at:  # not renewed meanwhile
                        self.expired += 1
                        self.log.warning("http.lease_expired", gate=lease.gate, lease_s=lease.lease_s)
                        raise CallerError("expired")
                if lease.outcome == "overload":
                    raise OverloadReported(f"the HTTP caller reported an overload under gate {lease.gate!r}")
                if lease.outcome == "error":
                    raise CallerError("the caller reported an error")
        except (OverloadReported, CallerError):
            pass
        except Error as e:  # no permit: the queue was full, no permit in time, the actor unreachable
            # (without its traceback: the frames it holds would keep this thread's connections and gate files
            # open until the cycle collector runs — hundreds of descriptors in an acquire storm)
            loop.call_soon_threadsafe(tell, e.with_traceback(None))
        except Exception as e:  # a bug: still answer the caller, and say where in the log
            self.log.error("http.lease_failed", gate=lease.gate, error=f"{type(e).__name__}: {e}"[:300])
            loop.call_soon_threadsafe(tell, Error(f"gate {lease.gate!r}: {type(e).__name__}"))
        finally:
            with self._lock:
                self._leases.pop(lease.id, None)

    def _find(self, gate: str, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.gate != gate or lease.permit is None:
            raise InputError(f"permit {lease_id[:40]!r}: no such permit held on gate {gate!r} (released, expired, "
                             "or never granted)", where="permit")
        return lease

    def release(self, gate: str, lease_id: str, outcome: str) -> None:
        lease = self._find(gate, lease_id)
        lease.outcome = outcome
        lease.released.set()

    def renew(self, gate: str, lease_id: str, lease_s: float | None) -> float:
        lease = self._find(gate, lease_id)
        lease.lease_s = lease_s or lease.lease_s
        lease.expires_at = time.monotonic() + lease.lease_s
        return lease.lease_s

    def release_all(self) -> None:
        """At shutdown: every permit back now (its caller's next call finds the server gone)."""
        with self._lock:
            leases = list(self._leases.values())
        for lease in leases:
            lease.outcome = "error"
            lease.abandoned = True
            lease.released.set()
        self.pool.shutdown(wait=False)
