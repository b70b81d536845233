"""A full disk and a read-only file system, for real: the database on a small tmpfs mounted for the test (needs
root, as CI runs; skipped elsewhere). What must hold: one line naming the path and the problem, never a
traceback; a full disk while running is waited out — workers block, keep their results, and carry on by
themselves once space returns, the supervisor never exits — and nothing is lost or done twice."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import cardq
from cardq import logs

from conftest import wait_for
from supervision import Deployment


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {got.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB file system of its own, unmounted (lazily: a process may still hold a file) at teardown."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "24m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path) -> Path:
    """Take every free byte of the file system; returns the file to delete to give them back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 20
        while chunk >= 512:  # big writes, then smaller ones for what a big one could not take
            try:
                os.write(fd, b"\0" * chunk)
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_full_disk_is_waited_out_and_nothing_is_lost(small_disk: Path, tmp_path: Path):
    # The log file is on the full disk too (its lines go to standard error meanwhile); the side-effect file is
    # on a healthy one, to count how often each job ran.
    effects = tmp_path / "effects"
    d = Deployment(small_disk, out_dir=tmp_path)
    try:
        n = 400
        ids = d.submit([{"sleep": 0.01, "big": 20_000, "append": str(effects)} for _ in range(n)])
        proc = d.start()
        wait_for(lambda: d.statuses().get("done", 0) >= 50, 60, what="jobs running")
        filler = fill(small_disk)

        # Workers block on their next write (a result that needs room); the supervisor stays up. (Their lines
        # reach the log file while its last page has room, then standard error.)
        wait_for(lambda: events(d).count("worker.blocked") >= 2, 60, what="both workers blocked")
        assert proc.poll() is None

        status = d.cardq("status")
        assert status.returncode == 0, status.stderr
        assert "disk full" in status.stdout

        refused = d.cardq("submit", "--user", "u2", "--plan", "enterprise", input_file(tmp_path, 50))
        assert refused.returncode == 1
        line = one_line(refused.stderr)
        assert "cardq.db: disk full" in line and "nothing was changed" in line

        # An app's counter increments are answered "unavailable" at once (not a timeout) once the database
        # cannot take them (the first few may still fit in the WAL's free frames), and the actor stays up.
        with cardq.connect(d.config_path, name="app") as q:
            for i in range(3000):
                try:
                    q.counter.incr("cards", 1, op_id=f"during-{i}")
                except cardq.ActorUnavailable as e:
                    assert "disk full" in str(e)
                    break
            else:
                raise AssertionError("3000 counter increments stored on a full disk")

        done_while_full = d.statuses().get("done", 0)
        os.unlink(filler)  # space returns: work goes on by itself
        wait_for(lambda: d.statuses(ids).get("done", 0) == n, 120, what="every job done after space returned")
        assert proc.poll() is None
        assert done_while_full < n  # the outage was real: jobs were waiting on it

        ran = [int(x) for x in effects.read_text().split()]
        assert sorted(ran) == sorted(ids)  # each job's side effect exactly once: nothing lost, nothing repeated
        assert not any(w["restarts"] for w in d.workers())  # no process exited over it
        with cardq.connect(d.config_path, name="app") as q:
            assert q.counter.incr("cards", 1, op_id="after") == i + 1  # the refused one was not stored
        wait_for(lambda: events(d).count("worker.unblocked") >= 2, 30, what="worker.unblocked logged")
    finally:
        d.close()
    assert "Traceback" not in d.output()
    assert "Traceback" not in (small_disk / "cardq.log").read_text()


def events(d: Deployment) -> list[str]:
    """Every event logged so far, from the log file and from standard error (where lines go while the log
    file cannot take them); every line must be whole JSON."""
    lines = [line for line in d.output().splitlines() if line.startswith("{")]
    return [line["event"] for line in d.log_lines()] + [orjson.loads(line)["event"] for line in lines]


def input_file(tmp_path: Path, n: int) -> str:
    path = tmp_path / "more.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"pad": "y" * 30_000}) + b"\n" for _ in range(n)))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_read_only_file_system_is_named_in_one_line(small_disk: Path, tmp_path: Path):
    d = Deployment(small_disk)
    try:
        d.db.close()
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        for args in (["supervise"], ["status"], ["submit", "--user", "u1", "--plan", "basic", input_file(tmp_path, 1)]):
            got = d.cardq(*args)
            assert got.returncode == 1, (args, got.stderr)
            assert "read-only file system" in one_line(got.stderr), args
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], capture_output=True)
        d.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_starting_on_a_full_disk_says_so_in_one_line(small_disk: Path):
    d = Deployment(small_disk)
    try:
        fill(small_disk)
        got = d.cardq("supervise", timeout=60)
        assert got.returncode == 1
        assert "disk full" in one_line(got.stderr)
    finally:
        d.close()


@pytest.mark.timeout(60)
def test_a_log_file_that_cannot_be_written_falls_back_to_stderr_and_comes_back_whole(tmp_path: Path):
    disk = tmp_path / "logdisk"
    mount_tmpfs(disk, "64k")
    try:
        err = tmp_path / "stderr"
        script = f"""
import os, sys, time
from cardq import logs
d = logs.Destination({str(disk / "x.log")!r})
for i in range(3000):
    d.write(b'{{"n": %d, "pad": "%s"}}' % (i, b"x" * 50))
os.unlink({str(disk / "x.log")!r} + ".filler") if os.path.exists({str(disk / "x.log")!r} + ".filler") else None
"""
        (disk / "x.log.filler").write_bytes(b"\0" * 8192)
        with open(err, "wb") as stderr:
            got = subprocess.run([sys.executable, "-c", script + f"""
time.sleep({logs.FILE_RETRY_S + 0.1})
d.write(b'{{"after": 1}}')
"""], stderr=stderr, timeout=50)
        assert got.returncode == 0
        lines = (disk / "x.log").read_bytes().splitlines()
        parsed = [orjson.loads(line) for line in lines]  # every line whole
        assert parsed[-2]["event"] == "log.file_resumed" and parsed[-1] == {"after": 1}
        kept = {p["n"] for p in parsed if "n" in p}
        spilled = [orjson.loads(line) for line in err.read_bytes().splitlines()]
        assert spilled[0]["event"] == "log.file_failed" and "disk full" in spilled[0]["reason"]
        moved = {p["n"] for p in spilled if "n" in p}
        assert kept | moved == set(range(3000)) and not kept & moved  # every line once, in the file or on stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_log_file_that_cannot_be_opened_is_one_line(tmp_path: Path):
    with pytest.raises(logs.FileError) as e:
        logs.open_destination(str(tmp_path / "missing" / "cardq.log"))
    path = tmp_path / "missing" / "cardq.log"
    assert str(e.value) == f"{path}: cannot open the log file (log.file): no such file or folder"
