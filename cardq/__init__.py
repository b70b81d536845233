"""cardq: a job and traffic system on one VM, with no Redis and no cloud queue.

    import cardq

    q = cardq.connect()                       # ./config.toml (or $CARDQ_CONFIG, or the built-in defaults)
    batch = q.submit([{"title": "Mug"}], user="u42", plan="basic")
    q.wait(batch.ids, timeout=60)
    q.ratelimit.check("ip:1.2.3.4")

Every error is a `cardq.Error`; the names below are the public API (see README.md, "Using cardq from Python").
"""

from cardq.api import (
    FINISHED,
    FORMATS,
    MAX_PRIORITY,
    STATUSES,
    Batch,
    CounterResult,
    JobInfo,
    JobPage,
    Limit,
    Queue,
    RateLimitDecision,
    connect,
    init,
    read_items,
    selftest,
    supervise,
)
from cardq.errors import (
    ActorError,
    ActorTimeout,
    ActorUnavailable,
    AlreadyRunning,
    ConfigError,
    Error,
    FileError,
    InputError,
    InvalidRequest,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    LimitExceeded,
    NotRunning,
    Overloaded,
    RestartIntensityExceeded,
    StoreBusy,
    StoreError,
    StoreUnwritable,
)
from cardq.handlers import Job, PermanentError

__all__ = [
    "FINISHED", "FORMATS", "MAX_PRIORITY", "STATUSES", "ActorError", "ActorTimeout", "ActorUnavailable",
    "AlreadyRunning", "Batch", "ConfigError", "CounterResult", "Error", "FileError", "InputError", "InvalidRequest",
    "InvalidTransition", "Job", "JobInfo", "JobNotFound", "JobPage", "LeaseLost", "Limit", "LimitExceeded",
    "NotRunning", "Overloaded", "PermanentError", "Queue", "RateLimitDecision", "RestartIntensityExceeded",
    "StoreBusy", "StoreError", "StoreUnwritable", "connect", "init", "read_items", "selftest", "supervise",
]
