"""Reloading config.toml in a running supervisor (SIGHUP): read and validate the new file, and say what
changed and what needs a restart. Nothing here touches a process; the supervisor applies the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from cardq.config import LoadedConfig, load_config
from cardq.handlers import load_handler


@dataclass(frozen=True)
class Reload:
    new: LoadedConfig
    changes: dict[str, tuple[Any, Any]]  # dotted key -> (old, new)
    restart_needed: dict[str, list[str]]  # reason -> keys that only apply at the next start


def read_new_config(current: LoadedConfig) -> Reload:
    """The config file as it is now, validated (its handler must import too: a handler that does not is a
    broken config as well). Raises ConfigError, leaving everything as it was."""
    new = load_config(current.path)
    load_handler(new.config.workers.handler)
    changes = diff_configs(current.config, new.config)
    restart: dict[str, list[str]] = {}
    if actor_shards(new) != actor_shards(current):
        restart["actor shard counts apply at the next start"] = [
            k for k in changes if k.startswith(("actors.", "paths.enabled"))]
    if new.config.store != current.config.store:
        restart["store settings apply at the next start; the rest applies now"] = [
            k for k in changes if k.startswith("store.")]
    return Reload(new, changes, restart)


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
