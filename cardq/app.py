"""What every command needs: the loaded config and an open database. Kept out of cli.py so tests and the
supervisor use the same code paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cardq.config import LoadedConfig, load_config, load_config_for_reading, resolve_config_path
from cardq.errors import InputError
from cardq.store import Database

DEFAULT_CONFIG_TEXT = (Path(__file__).parent / "default_config.toml").read_text


def load(config_path: str | os.PathLike | None) -> LoadedConfig:
    return load_config(resolve_config_path(config_path))


def load_for_reading(config_path: str | os.PathLike | None) -> tuple[LoadedConfig, str | None]:
    return load_config_for_reading(resolve_config_path(config_path))


def open_db(loaded: LoadedConfig, *, create: bool = False, autocheckpoint: bool = True) -> Database:
    cfg = loaded.config
    return Database.open(
        loaded.db_path,
        synchronous=cfg.store.synchronous,
        busy_timeout_ms=cfg.store.busy_timeout_ms,
        busy_retries=cfg.store.busy_retries,
        timezone=cfg.limits.timezone,
        create=create,
        autocheckpoint=autocheckpoint,
        max_kinds=cfg.metrics.max_kinds,
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '7d', '2w' (or a bare number of seconds) → seconds."""
    m = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,9})?)\s*([smhdw]?)\s*", text)
    if not m:
        raise InputError(f"duration {text!r}: expected a number (at most 12 digits) with a unit s, m, h, d or w, "
                         "such as 7d")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds > MAX_DURATION_S:
        raise InputError(f"duration {text!r}: expected at most 100 years")
    return seconds


MAX_DURATION_S = 100 * 365 * 86400
