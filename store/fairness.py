"""Fair share across users: start-time fair queueing on a virtual clock.

Policy. Jobs are claimed by priority first (higher first; priority always wins over fairness), then by `vt`, a
virtual time stamped at submit, then by age. A user's jobs get consecutive virtual times starting from the head
of the queue at that priority; a user who still has a backlog continues after their own last job instead. With
nothing queued at that priority, the floor is the largest virtual time ever assigned (kept in `sched.vt` at
submit, so a claim writes nothing extra).

So when user A has 300 jobs queued and user B submits 5, B's jobs interleave with A's remaining ones one for one,
rather than waiting behind all 300 (the old CardMaker's global FIFO, whose "processed in turn" claim was false).
A user idle for a while gains no credit: they start at the head, not in the past. Fairness is per priority level.
"""

from __future__ import annotations

import apsw


def assign(conn: apsw.Connection, user_id: str, priority: int, n: int, *, active: int, last_vt: int) -> int:
    """Reserve `n` consecutive virtual times for `user_id` at `priority`; returns the first.

    `active` and `last_vt` are the user's counters (store.usage.load). Call inside the transaction that inserts
    or requeues the jobs, before adjusting `active`: it reads the queue head and updates the user's last_vt.
    """
    head = conn.execute(
        "SELECT vt FROM jobs WHERE status = 'queued' AND priority = ? ORDER BY vt LIMIT 1", (priority,)
    ).fetchall()
    floor = head[0][0] if head else conn.execute("SELECT vt FROM sched WHERE id = 1").fetchall()[0][0]
    start = max(last_vt + 1, floor) if active else floor
    last = start + n - 1
    conn.execute(
        "INSERT INTO user_load (user_id, active, last_vt) VALUES (?, 0, ?) "
        "ON CONFLICT (user_id) DO UPDATE SET last_vt = excluded.last_vt",
        (user_id, last),
    )
    conn.execute("UPDATE sched SET vt = ? WHERE id = 1 AND vt < ?", (last, last))
    return start
