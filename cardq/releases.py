"""What becomes of a dead child's work, decided from how it died.

A worker's jobs are taken back by owner name (so it works even when none of its messages arrived): the job it
was running fails its attempt — with a kill counted when its process died under it (poison jobs die at
poison_kills) — unless it was not the job's fault (a shutdown, a database error, a config error), and the jobs
it had prefetched go back untouched. An actor that died while handling a message (its slot names the message)
counts one failure for that message: at 3 the restarted actor dead-letters it instead of dying on it again.
"""

from __future__ import annotations

import time
from typing import Any

from cardq.children import EXIT_CONFIG, EXIT_STORE
from cardq.config import LoadedConfig
from cardq.errors import StoreError
from cardq.store import Database, dead_letters, jobs
from cardq.tracked import TrackedChild


def release(db: Database, loaded: LoadedConfig, log: Any, child: TrackedChild, code: int | None,
            reason: str) -> None:
    if child.spec.role == "actor":
        _actor_died(db, log, child, code, reason)
    else:
        _worker_died(db, loaded, log, child, code, reason)


def _worker_died(db: Database, loaded: LoadedConfig, log: Any, child: TrackedChild, code: int | None,
                 reason: str) -> None:
    w, sup = loaded.config.workers, loaded.config.supervisor
    running, killed = child.current_job, False
    if child.kill_reason == "timeout":
        reason = f"timeout: the handler ran past job_timeout_s={w.job_timeout_s:g} and did not return; worker killed"
    elif child.kill_reason == "shutdown" or code in (0, EXIT_STORE, EXIT_CONFIG):
        running = None  # not the job's fault: give it back untouched
    else:
        killed = True
    try:
        out = jobs.release_owner(db, child.owner, running=running, error=reason, killed=killed,
                                 poison_kills=sup.poison_kills, backoff=jobs.Backoff(w.backoff_base_s, w.backoff_max_s))
    except StoreError as e:  # the leases stop being renewed, so `recover` takes them back later
        log.error("child.release_failed", child=child.name, reason=str(e))
        return
    if out.failed is not None or out.given_back:
        log.info("child.jobs_released", child=child.name, job_id=running,
                 job_now=out.failed.status if out.failed else None, given_back=out.given_back)


def _actor_died(db: Database, log: Any, child: TrackedChild, code: int | None, reason: str) -> None:
    fp = child.current_job
    if fp is None or code == 0:
        return
    fingerprint = f"{fp:012x}"
    try:
        dead_letters.count_failure(db, child.spec.args["actor"], fingerprint, f"killed its actor: {reason}",
                                   time.time())
    except StoreError as e:
        log.error("supervisor.actor_failure_failed", reason=str(e))
    log.warning("actor.died_in_message", child=child.name, fingerprint=fingerprint, reason=reason)
