"""cardq: a job and traffic system on one VM, with no Redis and no cloud queue.

    import cardq

    q = cardq.connect()                       # ./config.toml (or $CARDQ_CONFIG, or the built-in defaults)
    batch = q.submit([{"title": "Mug"}], user="u42", plan="basic")
    q.wait(batch.ids, timeout=60)
    q.ratelimit.check("ip:1.2.3.4")

Every error is a `cardq.Error`; the names below are the public API (see README.md, "Using cardq from Python").
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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
        systemd_unit,
    )
    from cardq.handlers import Job, PermanentError

# Loaded on first use, not at `import cardq`: an app (or `cardq --help`) that imports cardq pays for the store,
# the config schema and the actor client only when it calls them.
_LAZY = {
    **dict.fromkeys(["FINISHED", "FORMATS", "MAX_PRIORITY", "STATUSES", "Batch", "CounterResult", "JobInfo",
                     "JobPage", "Limit", "Queue", "RateLimitDecision", "connect", "init", "read_items",
                     "selftest", "supervise", "systemd_unit"], "cardq.api"),
    "Job": "cardq.handlers",
    "PermanentError": "cardq.handlers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cardq' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "FINISHED", "FORMATS", "MAX_PRIORITY", "STATUSES", "ActorError", "ActorTimeout", "ActorUnavailable",
    "AlreadyRunning", "Batch", "ConfigError", "CounterResult", "Error", "FileError", "InputError", "InvalidRequest",
    "InvalidTransition", "Job", "JobInfo", "JobNotFound", "JobPage", "LeaseLost", "Limit", "LimitExceeded",
    "NotRunning", "Overloaded", "PermanentError", "Queue", "RateLimitDecision", "RestartIntensityExceeded",
    "StoreBusy", "StoreError", "StoreUnwritable", "connect", "init", "read_items", "selftest", "supervise",
    "systemd_unit",
]
