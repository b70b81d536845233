"""No job is ever handed to two claimers: four real processes claim and complete 20,000 jobs."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from cardq.store import Database, jobs
from cardq.store.submit import NewJob, submit


def _worker(path: str, owner: str, k: int, out_file: str) -> None:
    db = Database.open(path, busy_timeout_ms=10_000, busy_retries=20)
    claimed = []
    while True:
        got = jobs.claim(db, owner, k=k, lease_s=300)
        if not got:
            break
        claimed.extend(j.id for j in got)
        lost = jobs.complete_many(db, [(j.id, j.token, owner) for j in got])
        assert not lost
    db.close()
    Path(out_file).write_text("\n".join(map(str, claimed)))


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 8])
def test_four_processes_claim_every_job_exactly_once(db, unlimited, tmp_path, k):
    n = 20_000
    ids = []
    for start in range(0, n, 5000):
        batch = [NewJob(b'{"n":%d}' % i) for i in range(start, start + 5000)]
        ids += submit(db, batch, user_id=f"u{start % 3}", plan="free", configured=unlimited).ids
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"claimed-{i}.txt" for i in range(4)]
    procs = [ctx.Process(target=_worker, args=(str(db.path), f"w{i}", k, str(outs[i]))) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    per_process = [[int(x) for x in f.read_text().split()] for f in outs]
    everything = [jid for claimed in per_process for jid in claimed]
    assert len(everything) == n  # nothing claimed twice ...
    assert sorted(everything) == sorted(ids)  # ... and nothing missed
    assert sum(1 for claimed in per_process if claimed) >= 2  # the processes really competed
    rows = db.conn.execute("SELECT status, result, count(*) FROM jobs GROUP BY status, result").fetchall()
    assert sum(r[2] for r in rows) == n and {r[0] for r in rows} == {"done"}
    # each job's result names the process that claimed it: the completions match the claims exactly
    owner_of = {jid: f"w{i}" for i, claimed in enumerate(per_process) for jid in claimed}
    stored = dict(db.conn.execute("SELECT id, json_extract(result, '$') FROM jobs").fetchall())
    assert stored == owner_of
