"""cardq under systemd: the unit `cardq systemd-unit` prints (checked by systemd-analyze where it is installed),
the notify protocol the supervisor speaks (stepped with made-up times, then heard from a real supervisor on a real
socket), and the process titles `ps` shows (read from /proc)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import setproctitle
from click.testing import CliRunner

import cardq
from cardq.actors.protocol import socket_path
from cardq.cli import cli
from cardq.sdnotify import READY_POLL_S, STATUS_EVERY_S, Notifier

from conftest import wait_for
from supervision import CARDQ, Deployment

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never the repository's ./config.toml, never an inherited CARDQ_CONFIG or systemd's variables."""
    monkeypatch.chdir(tmp_path)
    for name in ("CARDQ_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def setting(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_lines(text) if line.split("=", 1)[0] == key]


# ------------------------------------------------------------------------------------------------ the unit


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config whose database, run directory and log file are in three different folders."""
    root = tmp_path / "srv"
    for folder in ("data", "logs", "config"):
        (root / folder).mkdir(parents=True)
    config = root / "config" / "config.toml"
    config.write_text(f'[store]\npath = "{root}/data/cardq.db"\n[actors]\nrun_dir = "{tmp_path}/run"\n'
                      '[log]\nfile = "../logs/cardq.log"\n[supervisor]\nshutdown_timeout_s = 42.5\n')
    return config


@pytest.mark.timeout(30)
def test_the_unit_has_every_setting_systemd_needs(site, tmp_path):
    result = CliRunner().invoke(cli, ["systemd-unit", "--user", "cardq", "--config", str(site)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = result.stdout
    root = tmp_path / "srv"
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed",
                 "Restart=on-failure", "User=cardq", f"WorkingDirectory={root / 'config'}", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes", "UMask=0077", "WantedBy=multi-user.target"):
        assert line in unit_lines(text), line
    [exec_start] = setting(text, "ExecStart")
    words = exec_start.split()
    assert Path(words[0]).is_absolute() and Path(words[0]).name == "cardq" and os.access(words[0], os.X_OK)
    assert words[1:] == ["supervise", "--config", str(site)]
    [paths] = setting(text, "ReadWritePaths")
    folders = (root / "data", tmp_path / "run", root / "logs", root / "config")
    assert sorted(paths.split()) == sorted(os.path.realpath(p) for p in folders)
    [watchdog] = setting(text, "WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog) and int(watchdog[:-1]) >= 30
    [stop] = setting(text, "TimeoutStopSec")
    assert int(stop.removesuffix("s")) > 42.5  # past the supervisor's own grace for in-flight jobs
    assert text.index("[Unit]") < text.index("[Service]") < text.index("[Install]")


@pytest.mark.timeout(30)
def test_the_unit_names_each_writable_folder_once_and_no_user_unless_asked(tmp_path):
    (tmp_path / "config.toml").write_text("")  # the defaults: database and run directory beside the config
    text = cardq.systemd_unit(tmp_path / "config.toml")
    assert setting(text, "ReadWritePaths") == [str(tmp_path)]
    assert setting(text, "User") == []
    assert setting(text, "WatchdogSec") == ["60s"]  # 2 x 5 s busy timeout x 6 tries (documented in the README)
    assert setting(text, "TimeoutStopSec") == ["45s"]  # 30 s shutdown grace + 15 s


@pytest.mark.timeout(30)
def test_the_unit_needs_a_valid_config_file_and_a_plain_user_name(tmp_path):
    runner = CliRunner()
    none = runner.invoke(cli, ["systemd-unit"], catch_exceptions=False)  # no ./config.toml here
    assert none.exit_code == 2 and "no config file" in none.stderr and none.stdout == ""
    (tmp_path / "config.toml").write_text("[store]\nbogus = 1\n")
    bad = runner.invoke(cli, ["systemd-unit", "--config", "config.toml"], catch_exceptions=False)
    assert bad.exit_code == 2 and "store.bogus" in bad.stderr
    (tmp_path / "config.toml").write_text("")
    user = runner.invoke(cli, ["systemd-unit", "--user", "root\nExecStartPre=/bin/sh"], catch_exceptions=False)
    assert user.exit_code == 2 and "--user" in user.stderr and user.stdout == ""


@pytest.mark.timeout(30)
def test_paths_with_spaces_percent_and_dollar_are_quoted_for_systemd(tmp_path):
    folder = tmp_path / "my site 100%" / "$HOME"
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text("")
    text = cardq.systemd_unit(folder / "config.toml")
    escaped = str(folder).replace("%", "%%")
    assert setting(text, "WorkingDirectory") == [escaped]
    assert setting(text, "ReadWritePaths") == [f'"{escaped}"']
    assert setting(text, "ExecStart")[0].endswith(f'--config "{escaped.replace("$", "$$")}/config.toml"')


@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("folder", ["site", "a site 100%"])
def test_systemd_analyze_verifies_the_unit(tmp_path, folder):
    config = tmp_path / folder / "config.toml"
    config.parent.mkdir()
    config.write_text("")
    cardq.init(config)  # the database and run directory exist, as ReadWritePaths= needs at start
    # The venv's own cardq (as `cardq systemd-unit` run from it names itself); no --user: verify would look it up.
    unit = tmp_path / "cardq-test.service"
    unit.write_text(cardq.systemd_unit(config, argv0=CARDQ))
    assert setting(unit.read_text(), "ExecStart")[0].startswith(str(Path(CARDQ).resolve()))
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=50,
                          cwd=tmp_path)
    # systemd-analyze also reports on the host's own units (a container's missing ones): only ours count.
    ours = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert not ours, "\n".join(ours)


# ------------------------------------------------------------------------------- the notify protocol, stepped


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **kw) -> None:
        self.lines.append((event, kw))


@pytest.fixture
def listener(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting now (they were sent before this call: nothing to wait for)."""
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.timeout(30)
def test_without_notify_socket_nothing_is_made_and_the_loop_is_not_woken():
    log = Log()
    n = Notifier({"WATCHDOG_USEC": "200000"}, log)
    assert not n.enabled and n.sock is None
    assert n.seconds_to_next(0.0) == math.inf
    n.step(0.0, up=lambda: pytest.fail("asked"), status=lambda: pytest.fail("asked"))
    n.reloading()
    n.reloaded()
    n.stopping()
    assert log.lines == []


@pytest.mark.timeout(30)
def test_ready_status_and_watchdog_paced_by_the_loops_time(listener, tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier(env, Log())
    up, status = [False], ["starting\nup"]
    step = lambda now: n.step(now, up=lambda: up[0], status=lambda: status[0])  # noqa: E731
    step(100.0)
    assert received(listener) == ["WATCHDOG=1", "STATUS=starting up"]  # one line: a newline would start a field
    assert n.seconds_to_next(100.0) == READY_POLL_S  # not ready: look again soon
    up[0] = True
    step(100.5)
    assert received(listener) == ["READY=1"]  # the status is not looked at again within the second
    assert n.seconds_to_next(100.5) == pytest.approx(1.5)  # ready: the next ping, at half of WATCHDOG_USEC
    step(100.0 + STATUS_EVERY_S)
    assert received(listener) == []  # unchanged status: not sent again
    status[0] = "2 workers up"
    step(102.0)
    assert received(listener) == ["WATCHDOG=1", "STATUS=2 workers up"]
    step(102.1)
    assert received(listener) == []
    n.reloading()
    n.reloaded()
    n.stopping()
    reload, ready, stopping = received(listener)
    fields = dict(line.split("=", 1) for line in reload.splitlines())
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"} and fields["RELOADING"] == "1"
    assert abs(int(fields["MONOTONIC_USEC"]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
    assert (ready, stopping) == ("READY=1", "STOPPING=1")
    n.close()


@pytest.mark.timeout(30)
def test_no_watchdog_for_another_pid_and_no_reload_news_before_ready(listener, tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    n = Notifier(env, Log())
    n.reloading()
    n.reloaded()
    n.step(5.0, up=lambda: True, status=lambda: "up")
    assert received(listener) == ["READY=1", "STATUS=up"]
    assert n.seconds_to_next(5.0) == math.inf  # ready, no watchdog of ours: no wake-up for systemd
    n.close()


@pytest.mark.timeout(30)
def test_an_abstract_socket_is_reached():
    name = f"cardq-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name}, Log())
        n.stopping()
        assert received(sock) == ["STOPPING=1"]
        n.close()
    finally:
        sock.close()


@pytest.mark.timeout(30)
def test_a_socket_nobody_listens_on_is_logged_once_and_never_raised(tmp_path):
    log = Log()
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000"}, log)
    for i in range(20):
        n.step(float(i), up=lambda: True, status=lambda: "up")
    n.stopping()
    assert [event for event, _ in log.lines] == ["systemd.notify_failed"]
    n.close()
    log = Log()
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}, log).enabled
    assert [event for event, _ in log.lines] == ["systemd.notify_failed"]


# --------------------------------------------------------------------------------- a real supervisor, heard


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


class Heard:
    """The datagrams a supervisor sent to our socket, in order, read with a deadline."""

    def __init__(self, sock: socket.socket):
        self.sock, self.messages = sock, []

    def until(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond(self.messages):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {timeout}s waiting for {what}; heard {self.messages[-20:]}"
            self.sock.settimeout(min(left, 1.0))
            with contextlib.suppress(TimeoutError):  # (then the deadline is looked at again)
                self.messages.append(self.sock.recv(4096).decode())

    def since(self, n: int) -> list[str]:
        return self.messages[n:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_supervisor_tells_systemd_ready_status_watchdog_reload_and_stop(deploy, listener, tmp_path):
    d = deploy()
    heard = Heard(listener)
    proc = d.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    heard.until(lambda m: "READY=1" in m, 60, "READY=1")
    for actor in ("counter", "ratelimit", "paths"):  # up means reachable: each actor listens already
        assert socket_path(d.loaded.run_dir, actor, 0).exists(), actor
    heard.until(lambda m: "STATUS=2 workers, 3 actors up; 0 jobs pending, 0 running" in m, 30, "the status")
    heard.until(lambda m: m.count("WATCHDOG=1") >= 2, 30, "two watchdog pings")

    mark = len(heard.messages)
    os.kill(proc.pid, signal.SIGHUP)
    heard.until(lambda m: "READY=1" in m[mark:], 30, "READY=1 after the reload")
    reload = next(i for i, m in enumerate(heard.since(mark)) if m.startswith("RELOADING=1"))
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", heard.since(mark)[reload])
    assert "READY=1" in heard.since(mark)[reload + 1:]

    mark = len(heard.messages)
    os.kill(proc.pid, signal.SIGTERM)
    heard.until(lambda m: "STOPPING=1" in m[mark:], 30, "STOPPING=1")
    assert proc.wait(60) == 0
    assert not any(line["event"] == "systemd.notify_failed" for line in d.log_lines())


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
