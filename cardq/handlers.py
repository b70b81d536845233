"""The handler contract: `workers.handler = "module:function"` names a function `fn(job: Job) -> result`.

The result must be JSON-serialisable; it is stored as the job's result. Raise `PermanentError` for a failure no
retry can fix (bad input): the job goes straight to dead. Any other exception is a transient failure, retried
with backoff until max_attempts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cardq.config import Config
from cardq.errors import ConfigError


class PermanentError(Exception):
    """The job cannot succeed however often it is retried (e.g. a missing field)."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    user_id: str
    plan: str
    kind: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    config: Config


Handler = Callable[[Job], Any]


def load_handler(spec: str) -> Handler:
    """Import "module:function"; ConfigError naming the spec if it cannot be imported or is not callable."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is a config problem to report in one line
        raise ConfigError(f'workers.handler = "{spec}": cannot import {module_name}: {type(e).__name__}: {e}') \
            from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f'workers.handler = "{spec}": {module_name} has no function {func_name}')
    return fn


def noop(job: Job) -> None:
    """A handler that does nothing: for benchmarks and smoke tests of the machinery itself."""
    return None
