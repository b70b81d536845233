"""Reloading config.toml in a running supervisor (SIGHUP): read and validate the new file, and say what
changed and what needs a restart. Nothing here touches a process; the supervisor applies the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from cardq.config import LoadedConfig, load_config
from cardq.errors import ConfigError


@dataclass(frozen=True)
class Reload:
    new: LoadedConfig
    changes: dict[str, tuple[Any, Any]]  # dotted key -> (old, new)


# What the running processes were built on: the database, the actors' sockets, key and shards. Changing one
# live would split the tree (a worker looking for its key in a new run_dir dead-letters every job), so a file
# that changes one is refused whole until the next start.
RESTART_ONLY = ("store.", "actors.run_dir", "actors.counter_shards", "actors.ratelimit_shards", "actors.paths_shards",
                "actors.max_frame_bytes", "actors.max_connections", "paths.enabled", "metrics.max_kinds")


def read_new_config(current: LoadedConfig) -> Reload:
    """The config file as it is now, validated. Raises ConfigError, leaving everything as it was — also when the
    file changes a key that only applies at the next start (it names them). A changed workers.handler must be
    checked too, in a child (handlers.HandlerCheck), before the reload applies."""
    new = load_config(current.path)
    changes = diff_configs(current.config, new.config)
    restart_only = [k for k in changes if k.startswith(RESTART_ONLY)]
    if restart_only:
        raise ConfigError(f"{current.path}: {', '.join(restart_only)} changed, which needs a restart (`cardq stop`, "
                          "then `cardq supervise`); nothing was applied: the running config is kept whole")
    return Reload(new, changes)


def actor_shards(loaded: LoadedConfig) -> dict[str, int]:
    """Processes per actor (0: the actor is off)."""
    a = loaded.config.actors
    return {"counter": a.counter_shards, "ratelimit": a.ratelimit_shards,
            "paths": a.paths_shards if loaded.config.paths.enabled else 0}


def diff_configs(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (old, new) for every value that differs."""
    a, b = _flatten(msgspec.to_builtins(old)), _flatten(msgspec.to_builtins(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
