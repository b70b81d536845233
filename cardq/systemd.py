"""The systemd service unit that runs `cardq supervise` for one config file (`cardq systemd-unit`).

Type=notify: the supervisor says READY=1 once its children are up, RELOADING=1/READY=1 around a SIGHUP's
reload, STOPPING=1, and pings the watchdog from its loop (see sdnotify.py). The numbers come from the config:

- TimeoutStopSec: supervisor.shutdown_timeout_s (in-flight jobs finishing) plus STOP_MARGIN_S for what follows
  it (the kill of what is left, releasing its jobs, the actors' stop). KillMode=mixed sends SIGTERM to the
  supervisor alone, which stops its children in order; only what outlives TimeoutStopSec is SIGKILLed.
- WatchdogSec: twice the longest one store call may wait on a database another process keeps locked
  (store.busy_timeout_ms x store.busy_retries), at least WATCHDOG_MIN_S: 60 s with the defaults. A loop step
  makes a store call or two; a loop that pings nothing for that long is wedged, and systemd restarts the tree.
  (store.* keys apply only at a start, so a unit written for them stays right until the next restart.)
- ReadWritePaths: under ProtectSystem=strict everything else is read-only. Writable: the database's folder
  (the database, its WAL, the supervisor's lock), the run directory (sockets, key, gate files), the log file's
  folder, and the config file's folder (the supervisor's record of what it runs, config.toml.running, is
  written there by a rename). A folder inside another listed one is left out. Each must exist when the unit
  starts: `cardq init` makes the database and the run directory.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path

from cardq.config import LoadedConfig, resolve_path
from cardq.errors import ConfigError, InputError

STOP_MARGIN_S = 15
WATCHDOG_MIN_S = 30
USER_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10})$")  # a user name or a uid


def render(loaded: LoadedConfig, command: list[str], *, user: str | None = None) -> str:
    """The unit's text. `command` starts `cardq` (its absolute path, or python -m cardq.cli); the config must
    have come from a file, loaded by its absolute path."""
    if loaded.path is None or not loaded.path.is_absolute():
        raise ConfigError("a systemd unit runs one config file: pass --config PATH (or run `cardq init` here)")
    if user is not None and not USER_RE.match(user):
        raise InputError(f"--user {user!r}: expected a user name (letters, digits, '_', '.', '-') or a uid")
    cfg = loaded.config
    config_dir = loaded.path.parent
    writable = [loaded.db_path.parent, loaded.run_dir, config_dir]
    if cfg.log.file:  # opened from the working directory, which the unit sets to the config's folder
        writable.append(resolve_path(cfg.log.file, config_dir).parent)
    stop_s = math.ceil(cfg.supervisor.shutdown_timeout_s) + STOP_MARGIN_S
    watchdog_s = max(WATCHDOG_MIN_S, math.ceil(2 * cfg.store.busy_timeout_ms / 1000 * cfg.store.busy_retries))
    exec_start = " ".join(_exec_word(w) for w in [*command, "supervise", "--config", str(loaded.path)])
    lines = [
        f"# cardq supervisor for {_line(str(loaded.path))}, written by `cardq systemd-unit`. Install:",
        "#   cardq systemd-unit --config CONFIG [--user USER] > /etc/systemd/system/cardq.service",
        "#   systemctl daemon-reload && systemctl enable --now cardq",
        "",
        "[Unit]",
        f"Description=cardq supervisor ({_setting(str(loaded.path))})",
        "After=network.target",
        "",
        "[Service]",
        "# The supervisor says when it is ready (its children up), reloading and stopping, and pings the watchdog.",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        "# SIGHUP: re-read the config; an invalid file is refused and the running config kept.",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"WorkingDirectory={_setting(str(config_dir))}",
        *([f"User={user}"] if user is not None else []),
        "# SIGTERM to the supervisor alone: it lets in-flight jobs finish for up to shutdown_timeout_s "
        f"({cfg.supervisor.shutdown_timeout_s:g} s),",
        "# then stops its children in order; whatever is still running after TimeoutStopSec is killed.",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_s}s",
        "Restart=on-failure",
        "# Pinged every WatchdogSec/2 from the supervisor's loop: a wedged loop is restarted. Twice the longest a",
        f"# store call waits on a locked database (store.busy_timeout_ms x busy_retries), at least {WATCHDOG_MIN_S} s.",
        f"WatchdogSec={watchdog_s}s",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "# The database's, the run directory's, the log's and the config's folders (config.toml.running).",
        f"ReadWritePaths={' '.join(_list_word(str(p)) for p in _outermost(writable))}",
        "PrivateTmp=yes",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def command(argv0: str | None = None) -> list[str]:
    """How the unit starts cardq: `argv0` if it is a `cardq` executable (the one running now), else the one
    installed beside this Python, else the one on PATH, else this Python with -m cardq.cli."""
    candidates = [argv0] if argv0 and Path(argv0).name == "cardq" else []
    candidates += [str(Path(sys.executable).parent / "cardq"), shutil.which("cardq")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return [str(Path(c).resolve())]
    return [str(Path(sys.executable).absolute()), "-m", "cardq.cli"]


def _outermost(paths: list[Path]) -> list[Path]:
    """Each folder once, its real path, leaving out any inside another listed one."""
    real = sorted({Path(os.path.realpath(p)) for p in paths})
    return [p for p in real if not any(q != p and p.is_relative_to(q) for q in real)]


def _line(text: str) -> str:
    """A value on one line of the unit (a newline in a path would end the setting and start another)."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InputError(f"{text!r}: a path with a newline or control character cannot be written into a unit file")
    return text


def _setting(text: str) -> str:
    """A whole-line value: '%' starts a specifier there, so it is doubled."""
    return _line(text).replace("%", "%%")


def _list_word(text: str) -> str:
    """One word of a space-separated list: quoted if it has a space, a quote or a backslash."""
    text = _setting(text)
    if re.search(r'[\s"\'\\]', text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _exec_word(text: str) -> str:
    """One word of ExecStart=: as a list word, with '$' doubled too (systemd expands $VARIABLES there)."""
    return _list_word(text.replace("$", "$$"))
