"""The log path never blocks its caller: a stalled destination costs lines (counted), not time."""

from __future__ import annotations

import threading
import time

import orjson
import structlog

from cardq import logs

from conftest import wait_for


def test_put_never_blocks_when_the_writer_is_stuck():
    gate = threading.Event()
    written: list[bytes] = []

    def stuck_write(line: bytes) -> None:
        gate.wait(30)  # a disk or pipe that stopped taking data
        written.append(line)

    sink = logs.LineSink(stuck_write)
    started = time.perf_counter()
    for i in range(logs.QUEUE_MAX * 3):
        sink.put(b"line %d" % i)
    elapsed = time.perf_counter() - started
    assert elapsed < 5  # 30,000 puts against a stuck writer return at once (a generous bound, not a benchmark)
    assert sink.dropped >= logs.QUEUE_MAX  # the excess was dropped and counted
    gate.set()
    sink.close()
    dropped_notes = [orjson.loads(line) for line in written if line.startswith(b"{")]
    assert dropped_notes and dropped_notes[0]["event"] == "log.dropped" and dropped_notes[0]["lines"] > 0


def test_a_failing_destination_loses_lines_not_the_process():
    def broken(line: bytes) -> None:
        raise OSError(28, "No space left on device")

    sink = logs.LineSink(broken)
    for _ in range(100):
        sink.put(b"x")
    wait_for(lambda: sink.dropped >= 99, 10, what="lines counted as dropped")
    sink.close()


def test_json_lines_carry_role_pid_and_bound_job_id(tmp_path):
    out: list[bytes] = []
    sink = logs.LineSink(out.append)
    logs.configure("worker", level="info", fmt="json", sink=sink)
    structlog.contextvars.bind_contextvars(job_id=42)
    logs.get().info("job.done", attempt=1)
    structlog.contextvars.unbind_contextvars("job_id")
    logs.get().debug("hidden")  # below the level
    sink.close()
    lines = [orjson.loads(line) for line in out]
    assert len(lines) == 1
    assert {k: lines[0][k] for k in ("event", "role", "job_id", "attempt", "level")} == {
        "event": "job.done", "role": "worker", "job_id": 42, "attempt": 1, "level": "info"}
    assert isinstance(lines[0]["pid"], int) and lines[0]["timestamp"].endswith("Z")
