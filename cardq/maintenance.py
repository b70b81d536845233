"""The supervisor's periodic work on the database, each on its own period: renew the leases of live workers'
jobs, recover expired or overlong jobs, checkpoint the WAL, publish the process table for `cardq status`.

A failing store call is retried at its next period; it never stops the supervisor. A run of failures (a full
disk fails every write for as long as it lasts) is logged once when it starts and once when it ends, not at every
period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cardq.config import LoadedConfig
from cardq.doorbell import ring
from cardq.errors import StoreError
from cardq.store import Database, jobs, limits

WRITES = {"extend_leases", "recover", "publish"}  # the calls that commit (see _written)
PUBLISH_EVERY_S = 1.0
CHECKPOINT_EVERY_S = 0.5
WAL_TRUNCATE_ABOVE = 16 * 2**20  # bytes: past this the WAL is started over (see Database.checkpoint)
WAL_TRUNCATE_WAIT_MS = 100  # the longest writers wait for it
WAL_TRUNCATE_RETRY_MAX_S = 1.0  # truncates that keep failing (a long read) are tried at most this often


class Maintenance:
    def __init__(self, db: Database, loaded: LoadedConfig, log: Any, *, owners: Callable[[], list[str]],
                 publish: Callable[[], None]):
        self.db, self.loaded, self.log = db, loaded, log
        self.owners = owners  # the lease owners of the live workers (busy_only=True: of those not idle)
        self.publish = publish
        self.due: dict[str, float] = {}
        self.truncate_retry_at = 0.0
        self.truncate_failures = 0
        self.failing: dict[str, tuple[float, int]] = {}  # what -> (monotonic since, failures), while it fails
        self.token: int | None = None  # the database's change token at the last checkpoint
        self.wrote = True  # this process committed since the last checkpoint (its own commits move no token)
        self.written_at = 0.0  # monotonic: when a checkpoint last found that another process had written

    def step(self, now: float) -> None:
        w, sup = self.loaded.config.workers, self.loaded.config.supervisor
        if self._due("extend", now, w.lease_s / 3):
            owners = self.owners(busy_only=True)  # an idle worker holds no job: nothing to renew
            if owners:
                self.call("extend_leases", lambda: jobs.extend_owned(self.db, owners, lease_s=w.lease_s))
        if self._due("recover", now, sup.recover_interval_s):
            live = self.owners()
            got = self.call("recover", lambda: jobs.recover(self.db, processing_timeout_s=self.processing_timeout(),
                                                            live_owners=live))
            if got is not None and got.total:
                self.log.warning("jobs.recovered", requeued=got.requeued, dead=got.dead)
                ring(self.loaded.run_dir)  # requeued jobs are runnable: wake idle workers
        # Workers and actors do not checkpoint (a commit that crosses the threshold would pay for it): we do,
        # here. PASSIVE on a timer keeps the database file current without anyone waiting; the WAL's size, a
        # stat on every step, starts the log over once it passes the bound, however fast writers fill it.
        truncate = now >= self.truncate_retry_at
        if (self._due("checkpoint", now, CHECKPOINT_EVERY_S) and self._written()) or (truncate and self._wal_over()):
            size = self.call("checkpoint", lambda: self.db.checkpoint(
                truncate_above=WAL_TRUNCATE_ABOVE if truncate else None, wait_ms=WAL_TRUNCATE_WAIT_MS))
            if truncate and size is not None and size > WAL_TRUNCATE_ABOVE:
                # It could not start the log over. Once in a while a busy writer is the reason, and the next step
                # succeeds; when it keeps failing, a reader holds an old snapshot (a long read), and trying at
                # every step would make the writers wait each time for nothing: back off, up to once a second.
                # The WAL may grow until that read ends.
                self.truncate_failures += 1
                self.truncate_retry_at = now + min(WAL_TRUNCATE_RETRY_MAX_S, 0.025 * 2 ** self.truncate_failures)
            elif truncate and size is not None:
                self.truncate_failures = 0
        if self._due("publish", now, PUBLISH_EVERY_S):
            self.publish()

    def _written(self) -> bool:
        """Has anyone committed since the last checkpoint (another process, or this one)? An idle database is
        not checkpointed twice a second for nothing."""
        token = self.call("change token", self.db.change_token)
        written = self.wrote or token != self.token
        if token != self.token:  # another process wrote (the supervisor's own heartbeat is not activity)
            self.written_at = time.monotonic()
        self.token, self.wrote = token, False
        return written

    def _wal_over(self) -> bool:
        try:
            return self.db.wal_bytes() > WAL_TRUNCATE_ABOVE
        except OSError:
            return False

    def _due(self, what: str, now: float, every: float) -> bool:
        if now < self.due.get(what, 0.0):
            return False
        self.due[what] = now + every
        return True

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            out = fn()
        except StoreError as e:
            since, count = self.failing.get(what, (None, 0))
            if since is None:
                self.log.error(f"supervisor.{what}_failed", reason=str(e), retrying="at its next period")
                since = time.monotonic()
            self.failing[what] = (since, count + 1)
            return None
        if what in WRITES:
            self.wrote = True
        if what in self.failing:
            since, count = self.failing.pop(what)
            self.log.warning(f"supervisor.{what}_recovered", failed_for_s=round(time.monotonic() - since, 1),
                             failures=count)
        return out

    def processing_timeout(self) -> float:
        """job_processing_timeout_seconds in effect (a database override applies too)."""
        values = self.loaded.limit_values()
        try:
            return float(limits.in_effect(self.db, values)["job_processing_timeout_seconds"])
        except StoreError:
            return float(values["job_processing_timeout_seconds"][0])
