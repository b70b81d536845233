"""Store errors: each message is one complete line for an operator."""

from __future__ import annotations

from cardq.errors import EXIT_LIMIT, EXIT_USAGE, CardqError


class StoreError(CardqError):
    """The database could not be used (missing, not cardq's, too new, full, unreadable)."""


class StoreBusy(StoreError):
    """SQLITE_BUSY outlasted busy_timeout on every one of the bounded retries."""


class LeaseLost(StoreError):
    """complete/fail/extend by a holder whose lease was taken over (expired and reclaimed, recovered, cancelled)."""


class JobNotFound(StoreError):
    exit_code = EXIT_USAGE


class InvalidTransition(StoreError):
    """An operator action that the job's current status does not allow (e.g. cancel a done job)."""

    exit_code = EXIT_USAGE


class LimitExceeded(StoreError):
    """A submit refused by a limit; nothing was inserted. `limit` is the limit's key."""

    exit_code = EXIT_LIMIT

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit
