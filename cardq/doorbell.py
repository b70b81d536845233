"""The supervisor's doorbell: a Unix datagram socket in the run directory (0600, in a 0700 folder: only cardq's
user can ring). Whoever makes jobs runnable — a submit, a retry, through the API or the CLI — rings it after the
commit: one `sendto` that never blocks and never fails the caller (no supervisor: nobody to tell; a full socket
buffer: wake-ups are already pending). The supervisor waits on it with everything else (see wakeups.py), so with
nothing to do it sleeps. Kept apart from wakeups.py so that ringing loads nothing but `socket`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

DOORBELL = "wake.sock"


def ring(run_dir: Path) -> None:
    """Tell the supervisor that jobs became runnable. Never blocks, never raises."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.sendto(b"!", str(run_dir / DOORBELL))


class Doorbell:
    """The supervisor's end of the doorbell."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / DOORBELL
        fresh = run_dir / f".wake.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old = os.umask(0o177)  # 0600 from the start: no window in which another user could ring
        try:
            self.sock.bind(str(fresh))
        finally:
            os.umask(old)
        os.replace(fresh, self.path)  # a dead predecessor's socket file is simply replaced
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Take every ring waiting; whether there was any."""
        rang = False
        while True:
            try:
                self.sock.recv(64)
                rang = True
            except OSError:  # BlockingIOError: none left
                return rang

    def gone(self) -> bool:
        """Was our socket file removed (the run directory deleted under us)? Then make a new Doorbell."""
        return not self.path.exists()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
