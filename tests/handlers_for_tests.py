"""Handlers the supervisor tests run in real worker processes (imported there by name via PYTHONPATH).

`behave` does what the job's payload asks, so one config serves every scenario:
  {"sleep": s}        sleep s seconds (interruptible by the job timeout)
  {"stubborn": s}     sleep s seconds and swallow the job timeout, so only a kill stops it
  {"exit": code}      os._exit(code): the worker process dies mid-job
  {"fail": "msg"}     raise (transient), or with "permanent": true, PermanentError
  {"side_db": path}   record this job's execution in a side-effect table (idempotent per job id) first
  {"deep": n}         return a result nested n levels deep
  {"touch_after": p}  create the file p as the handler's last step (it has returned once p exists)
  {"append": p}       append "<job id>\n" to the file p first (one write with O_APPEND: a line is whole or absent)
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import apsw

from cardq.handlers import Job, PermanentError


def behave(job: Job) -> dict:
    p = job.payload
    if "append" in p:
        fd = os.open(p["append"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{job.id}\n".encode())
        finally:
            os.close(fd)
    if "side_db" in p:
        record_side_effect(p["side_db"], job.id)
    if "stubborn" in p:
        deadline = time.monotonic() + p["stubborn"]
        while time.monotonic() < deadline:
            with contextlib.suppress(BaseException):  # deliberately swallows the job timeout
                time.sleep(0.05)
    if "sleep" in p:
        time.sleep(p["sleep"])
    if "wait_file" in p:  # run until the test says go (by making the file), for a minute at most
        deadline = time.monotonic() + 60
        while not Path(p["wait_file"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    if "exit" in p:
        os._exit(p["exit"])
    if "deep" in p:
        result: object = "bottom"
        for _ in range(p["deep"]):
            result = [result]
        return result
    if "fail" in p:
        if p.get("permanent"):
            raise PermanentError(p["fail"])
        raise RuntimeError(p["fail"])
    if "hold" in p:  # time spent inside the gate's permit, as a monotonic interval appended to a file
        started = time.monotonic()
        time.sleep(p["hold"])
        with open(p["intervals"], "a") as f:
            f.write(f"{started} {time.monotonic()}\n")
    if "big" in p:  # a result that takes room in the database
        return {"job": job.id, "blob": "x" * p["big"]}
    if "touch_after" in p:
        Path(p["touch_after"]).write_text(str(job.attempt))
    return {"job": job.id, "attempt": job.attempt, "pid": os.getpid()}


def record_side_effect(path: str, job_id: int) -> None:
    conn = apsw.Connection(path)
    conn.setbusytimeout(10_000)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("CREATE TABLE IF NOT EXISTS effects (job_id INTEGER PRIMARY KEY, runs INTEGER NOT NULL)")
    conn.execute("INSERT INTO effects VALUES (?, 1) ON CONFLICT (job_id) DO UPDATE SET runs = runs + 1", (job_id,))
    conn.close()
