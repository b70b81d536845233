"""Fair share across users: start-time fair queueing on a virtual clock.

Policy. Jobs are claimed by priority first (higher first; priority always wins over fairness), then by `vt`, a
virtual time stamped at submit, then by age. A user's jobs get consecutive virtual times starting from the head
of the queue at that priority; a user who still has a backlog continues after their own last job instead. With
nothing queued at that priority, the floor is the largest virtual time ever assigned (kept in `sched.vt` at
submit, so a claim writes nothing extra).

So when user A has 300 jobs queued and user B submits 5, B's jobs interleave with A's remaining ones one for one,
rather than waiting behind all 300 (the old CardMaker's global FIFO, whose "processed in turn" claim was false).
A user idle for a while gains no credit: they start at the head, not in the past. Fairness is per priority level.

Bound (property-tested): with m users holding queued jobs, at most 2(m-1) claims of others come between two claims
of one user — m-1 when each user submitted one batch. (Ties in virtual time go by job id, so a user's later batch
can order differently within a round.)
"""

from __future__ import annotations

import apsw


def start_vt(conn: apsw.Connection, priority: int, *, active: int, last_vt: int, assigned_max: int) -> int:
    """The first virtual time for a user's next jobs at `priority` (reads only; call inside the transaction that
    inserts or requeues them, which then stores the user's new last_vt and raises sched.vt: see `reserved`).

    `active` and `last_vt` are the user's counters (store.usage.load); `assigned_max` is sched.vt.
    """
    head = conn.execute(_HEAD, (priority,)).fetchall()
    floor = head[0][0] if head else assigned_max
    return max(last_vt + 1, floor) if active else floor


_HEAD = "SELECT vt FROM jobs WHERE status = 'queued' AND priority = ? ORDER BY vt LIMIT 1"
