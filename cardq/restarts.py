"""The restart policy for permanent children, OTP-style, as a small state machine stepped with the time.

A child that exits without being asked to is started again after min(backoff_max_s, 0.1 * 2^(n-1)) seconds, n
being the restarts within the last max_seconds. More than max_restarts restarts within max_seconds means the
tree is crash-looping: `exited` raises RestartIntensityExceeded and the supervisor stops everything, so that
whoever runs it (systemd) escalates instead of watching the loop.

No processes and no clock here: the supervisor passes `now` (monotonic seconds) and a `spawn(name)` function,
so tests step the policy with a fake spawner and made-up times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from cardq.errors import RestartIntensityExceeded

FIRST_DELAY_S = 0.1


class RestartPolicy:
    def __init__(self, spawn: Callable[[str], None], *, max_restarts: int, max_seconds: float,
                 backoff_max_s: float):
        self.spawn = spawn
        self.max_restarts, self.max_seconds, self.backoff_max_s = max_restarts, max_seconds, backoff_max_s
        self.recent: deque[float] = deque()  # times of the restarts within the window
        self.due: dict[str, float] = {}  # child name -> when to start it

    def configure(self, *, max_restarts: int, max_seconds: float, backoff_max_s: float) -> None:
        """New limits (a reload); restarts already counted stay counted."""
        self.max_restarts, self.max_seconds, self.backoff_max_s = max_restarts, max_seconds, backoff_max_s

    def start(self, name: str, now: float) -> None:
        """A new child (first start, or a scale-up): started at the next step, not counted as a restart."""
        self.due[name] = now

    def exited(self, name: str, now: float, reason: str = "") -> float:
        """A child died unasked: schedule its restart and return the delay; RestartIntensityExceeded (nothing
        scheduled) when this restart would be one too many within the window."""
        self.recent.append(now)
        while self.recent and self.recent[0] < now - self.max_seconds:
            self.recent.popleft()
        if len(self.recent) > self.max_restarts:
            raise RestartIntensityExceeded(
                f"restart intensity exceeded: {len(self.recent)} restarts within {self.max_seconds:g}s "
                f"(max_restarts={self.max_restarts}); last: {name} {reason}".rstrip())
        delay = min(self.backoff_max_s, FIRST_DELAY_S * 2 ** (len(self.recent) - 1))
        self.due[name] = now + delay
        return delay

    def cancel(self, name: str) -> None:
        """Do not start this child (it was scaled away, or everything is stopping)."""
        self.due.pop(name, None)

    def pending(self, name: str) -> bool:
        return name in self.due

    @property
    def restarts_in_window(self) -> int:
        return len(self.recent)

    def step(self, now: float) -> list[str]:
        """Start every child whose time has come (through `spawn`); their names, in the order started."""
        ready = sorted((t, name) for name, t in self.due.items() if t <= now)
        for _t, name in ready:
            del self.due[name]
            self.spawn(name)
        return [name for _t, name in ready]
