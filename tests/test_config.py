"""config.toml: the documented default equals the built-in defaults and documents every key; bad files are
refused with one line naming the key, the value and what is expected."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from cardq.cli import exit_code
from cardq.config import Config, GateConfig, load_config, parse_config
from cardq.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def all_keys(struct=Config, prefix=""):
    """Every scalar key (tables of named entries, such as [gates.NAME], are checked by their own section)."""
    for field in msgspec.structs.fields(struct):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from all_keys(field.type, f"{prefix}{field.name}.")
        elif not (getattr(field.type, "__origin__", None) is dict and prefix == ""):
            yield f"{prefix}{field.name}"


def test_documented_config_equals_builtin_defaults():
    loaded = load_config(ROOT / "config.toml")
    assert loaded.config == Config()


def test_every_key_in_config_toml_has_a_comment_with_its_default():
    text = (ROOT / "config.toml").read_text().splitlines()
    section = ""
    seen = set()
    for i, line in enumerate(text):
        if m := re.match(r"^\[(.+)\]$", line):
            section = m.group(1)
            continue
        if m := re.match(r"^(\w+) = ", line):
            key = f"{section}.{m.group(1)}"
            seen.add(key)
            comments = []
            j = i - 1
            while j >= 0 and (text[j].startswith("#") or re.match(r"^\w+ = ", text[j])):
                comments.append(text[j])
                j -= 1
            assert any(c.startswith("#") for c in comments), f"{key} has no comment"
            assert any("Default" in c for c in comments), f"{key}: comment does not state the default"
    expected = {k for k in all_keys() if not k.startswith("limits.daily")}
    expected |= {f"gates.generation.{k}" for k in all_keys(GateConfig)}
    assert expected <= seen, f"undocumented keys: {expected - seen}"


def test_no_file_means_builtin_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_config(None)
    assert loaded.config == Config() and loaded.path is None and loaded.source == "built-in defaults"
    assert loaded.db_path == tmp_path / "cardq.db"


def test_relative_store_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "config.toml"
    cfg.write_text('[store]\npath = "data/q.db"\n')
    assert load_config(cfg).db_path == tmp_path / "etc" / "data" / "q.db"


def test_explicit_keys_decide_the_source_of_limits(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[limits]\nbatch_max_items_per_request = 50\n[limits.daily]\nfree = 7\nteam = 500\n")
    values = load_config(cfg).limit_values()
    assert values["batch_max_items_per_request"] == (50, "config")
    assert values["batch_max_queued_per_user"] == (300, "default")
    assert values["daily.free"] == (7, "config") and values["daily.team"] == (500, "config")
    assert values["daily.basic"] == (20, "default")  # plans the file does not name keep their defaults


def test_integers_are_accepted_for_float_keys():
    assert parse_config(b"[workers]\nlease_s = 30\n").workers.lease_s == 30.0


@pytest.mark.parametrize("toml, message", [
    ('[workers]\ncount = "three"', 'workers.count = "three": expected an integer, got a string'),
    ("[workers]\ncount = -1", "workers.count = -1: expected an integer >= 0"),
    ("[workers]\nthreads = 4", "unknown key workers.threads; expected one of: count, handler"),
    ("[worker]\ncount = 4", "unknown key worker; expected one of: store, workers, limits"),
    ("workers = 3", "workers = 3: expected a table, got an integer"),
    ('[store]\nsynchronous = "off"', 'store.synchronous = "off": expected "normal" or "full"'),
    ("[limits]\nbatch_max_items_per_request = 0", "limits.batch_max_items_per_request = 0: expected an integer >= 1"),
    ('[limits]\ntimezone = "Mars/Base"', 'limits.timezone = "Mars/Base": expected an IANA time zone'),
    ("[limits.daily]\nfree = -5", "limits.daily.free = -5: expected an integer >= 0"),
    ('[limits.daily]\n"Free Plan" = 5', 'limits.daily."Free Plan": expected a plan name'),
    ('[store]\nsynchronous = "nor\\nmal"', 'store.synchronous = "nor\\nmal": expected "normal" or "full"'),
    ('[workers]\nhandler = "nocolon"', 'workers.handler = "nocolon": expected "module:function"'),
    ("[workers]\nbackoff_base_s = 10.0\nbackoff_max_s = 1.0", "workers.backoff_max_s = 1.0: expected >="),
    ("[workers\ncount = 1", "invalid TOML"),
])
def test_bad_config_is_one_line_naming_key_and_value(tmp_path, toml, message):
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = str(e.value)
    assert message in text and "\n" not in text and text.startswith(str(cfg))
    assert exit_code(e.value) == 2


def test_missing_and_binary_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
