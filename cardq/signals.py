"""The supervisor's signals: SIGTERM, SIGINT and SIGHUP only count (handlers set flags and nothing else), and
a wake-up pipe makes the supervisor's wait return at once when one arrives; the main loop acts on the counts."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

WATCHED = {"term": signal.SIGTERM, "int": signal.SIGINT, "hup": signal.SIGHUP}


class SignalFlags:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(WATCHED, 0)
        self.wake_r = self._wake_w = -1
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for flag, signum in WATCHED.items():
            self._previous[signum] = signal.signal(signum, self._counter(flag))

    def _counter(self, flag: str):
        def handler(_signum: int, _frame: object) -> None:
            self.counts[flag] += 1  # only a flag: the supervisor's step acts on it

        return handler

    def take(self, flag: str) -> int:
        """How many of this signal came since the last take (and forget them)."""
        n, self.counts[flag] = self.counts[flag], 0
        return n

    def drain(self) -> None:
        """Empty the wake-up pipe (its bytes only woke the wait)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 512)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self.wake_r >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self.wake_r)
            os.close(self._wake_w)
            self.wake_r = self._wake_w = -1
