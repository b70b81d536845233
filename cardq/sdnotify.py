"""systemd's notify protocol, as the supervisor speaks it (sd_notify(3), without libsystemd): one datagram per
message, "KEY=value" lines, to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' names the abstract
namespace).

Under the `Type=notify` unit that `cardq systemd-unit` prints, systemd learns from it:
- READY=1 once every permanent child is up (actors listening, workers past their start): `systemctl start`
  returns, and units ordered after cardq start, only then;
- STATUS=<one line> for `systemctl status`, sent when it changes, looked at most once a second;
- RELOADING=1 with MONOTONIC_USEC when a SIGHUP's reload begins, READY=1 once it is applied or refused;
- STOPPING=1 when shutdown begins;
- WATCHDOG=1 every WATCHDOG_USEC/2 (when systemd set it for this pid): sent from the supervisor's loop, so a
  loop that wedges stops pinging and systemd kills and restarts the tree (WatchdogSec=).

With NOTIFY_SOCKET unset nothing happens at all: no socket, no timer, no wake-up. A send that fails is logged
once and never raised: a supervisor that systemd cannot hear from still runs its jobs.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

STATUS_EVERY_S = 1.0  # the status line is looked at (and sent if it changed) at most this often
READY_POLL_S = 0.05  # until READY=1 is sent, the loop looks this often whether the children are up (an actor
# that starts listening says nothing to the supervisor, so nothing else would wake it for that)


class Notifier:
    """What the supervisor tells systemd. Every method is a no-op when systemd is not listening; `step` and
    `seconds_to_next` take the loop's monotonic time, so tests step it with made-up times."""

    def __init__(self, environ: Mapping[str, str], log: Any, pid: int | None = None):
        self.log = log
        self.sock: socket.socket | None = None
        self.address = environ.get("NOTIFY_SOCKET", "")
        self.watchdog_every: float | None = None  # seconds between pings; None: no watchdog
        self.next_ping = -math.inf  # monotonic: the first step pings
        self.ready = False  # READY=1 sent (the first time): the service has started
        self.status = ""
        self.status_looked_at = -math.inf
        self.failed = False  # a send failed: logged once
        if not self.address:
            return
        if not self.address.startswith(("/", "@")):  # e.g. vsock: (a VM's manager): not a socket we can reach
            self._failed(f"NOTIFY_SOCKET={self.address!r} is not a Unix socket path")
            return
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._failed(e.strerror or str(e))
            return
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
            return  # the watchdog is another process's (we were started by one that systemd watches)
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        if usec > 0:
            self.watchdog_every = usec / 2e6

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> None:
        if self.sock is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self.sock.sendto("\n".join(lines).encode(), target)
        except OSError as e:  # the manager gone, its queue full: it hears nothing from us, we run on
            self._failed(e.strerror or str(e))

    def _failed(self, reason: str) -> None:
        if not self.failed:
            self.failed = True
            self.log.warning("systemd.notify_failed", socket=self.address, reason=reason,
                             next="further failures are not logged")

    # ---- what the supervisor says -------------------------------------------------------------------------

    def step(self, now: float, *, up: Callable[[], bool], status: Callable[[], str]) -> None:
        """From every step of the loop: READY=1 once `up()` says so, the watchdog's ping when due, and the
        status line when it changed (`status()` is called at most once a second: it may read the database)."""
        if self.sock is None:
            return
        if not self.ready and up():
            self.ready = True
            self.send("READY=1")
            self.status_looked_at = -math.inf  # what it is ready with, at once
        if self.watchdog_every is not None and now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.watchdog_every
        if now >= self.status_looked_at + STATUS_EVERY_S:
            self.status_looked_at = now
            text = " ".join(status().split())  # one line: a newline would start another field
            if text != self.status:
                self.status = text
                self.send(f"STATUS={text}")

    def seconds_to_next(self, now: float) -> float:
        """How long the loop may sleep before this needs a step: the next ping, or soon while not ready yet.
        Without systemd (or without its watchdog, once ready) infinite: it adds no wake-up to an idle tree."""
        if self.sock is None:
            return math.inf
        until = max(0.0, self.next_ping - now) if self.watchdog_every is not None else math.inf
        return until if self.ready else min(until, READY_POLL_S)

    def reloading(self) -> None:
        """A SIGHUP's reload begins (systemd shows the unit "reloading" until `reloaded`). Before the service is
        ready there is nothing to say: READY=1 comes when the children are up."""
        if self.ready:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000  # systemd matches it to the reload asked
            self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def reloaded(self) -> None:
        """The reload was applied or refused: ready again either way (a refused one keeps the running config)."""
        if self.ready:
            self.send("READY=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
        self.status_looked_at = -math.inf  # why, at the next step

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
