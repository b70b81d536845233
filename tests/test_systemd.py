"""cardq under systemd and ps: the process titles `ps` shows (read from /proc)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import setproctitle

import cardq

from conftest import wait_for
from supervision import Deployment


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never the repository's ./config.toml, never an inherited CARDQ_CONFIG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARDQ_CONFIG", raising=False)


@pytest.fixture
def deploy(tmp_path):
    made: list[Deployment] = []

    def factory(**overrides) -> Deployment:
        d = Deployment(tmp_path / "site", **overrides)
        made.append(d)
        return d

    (tmp_path / "site").mkdir()
    yield factory
    for d in made:
        d.close()


# ----------------------------------------------------------------------------------------- process titles


def title(pid: int) -> str:
    """What ps shows for pid ("" once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def children_titles(pid: int) -> set[str]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == pid:
            out.add(title(int(stat.parent.name)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_process_of_the_tree_has_a_readable_title(deploy, tmp_path):
    d = deploy(workers={"count": 1})
    proc = d.start()
    wait_for(lambda: title(proc.pid) == "cardq: supervisor", 30, what="the supervisor's title")
    expected = {"cardq: worker-1 idle", "cardq: counter-0", "cardq: ratelimit-0", "cardq: paths-0"}
    wait_for(lambda: expected <= children_titles(proc.pid), 60, what=f"titles {expected}")
    go = tmp_path / "go"
    [job] = d.submit([{"wait_file": str(go)}])
    wait_for(lambda: f"cardq: worker-1 job {job}" in children_titles(proc.pid), 30, what="the job in the title")
    go.touch()
    wait_for(lambda: "cardq: worker-1 idle" in children_titles(proc.pid), 30, what="idle again")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.mark.timeout(30)
def test_a_supervisor_run_in_process_gives_the_title_back(tmp_path):
    # An app may run cardq.supervise() in its own process: its title is its own again afterwards.
    before = setproctitle.getproctitle()
    (tmp_path / "config.toml").write_text("")
    cardq.supervise(tmp_path / "config.toml", burst=True)  # nothing queued: it stops before spawning anything
    assert setproctitle.getproctitle() == before
