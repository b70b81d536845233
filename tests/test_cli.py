"""The `cardq` command line, through click's CliRunner (and twice through the real console script).

Every test works in its own tmp_path with a real SQLite file; the working directory is always tmp_path, so no
test can touch the repository's ./config.toml or ./cardq.db. Exit codes: 0 success, 2 usage/config/input
error, 3 rejected by a limit, 1 any other failure; a failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import click
import pytest
from click.testing import CliRunner, Result

from cardq import app
from cardq.cli import cli
from cardq.config import LIMIT_SCALAR_KEYS
from cardq.store import Database
from cardq.store import jobs as store_jobs
from cardq.store.schema import APPLICATION_ID, SCHEMA_VERSION, STATUSES

DEFAULT_PLANS = ("free", "basic", "professional", "enterprise")
ALL_LIMIT_KEYS = (*LIMIT_SCALAR_KEYS, *(f"daily.{p}" for p in DEFAULT_PLANS))


# --------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never the repository's cwd (it has a config.toml), never an inherited CARDQ_CONFIG or CARDQ_DEBUG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARDQ_CONFIG", raising=False)
    monkeypatch.delenv("CARDQ_DEBUG", raising=False)


class Cq:
    """A cardq deployment in tmp_path/site (config.toml + cardq.db next to it), driven through CliRunner.

    The working directory (tmp_path) holds no config.toml, so a command that ignored --config would fall back to
    the built-in defaults and ./cardq.db, which does not exist, and fail.
    """

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.site = tmp_path / "site"
        self.cfg = self.site / "config.toml"
        self.db = self.site / "cardq.db"
        self.runner = CliRunner()

    def write_config(self, text: str = "") -> Path:
        self.site.mkdir(exist_ok=True)
        self.cfg.write_text(text)
        return self.cfg

    def init(self, config_text: str = "") -> Cq:
        self.write_config(config_text)
        self.ok("init")
        assert self.db.is_file()
        return self

    def __call__(self, *args: object, input: str | bytes | None = None, env: dict[str, str] | None = None,
                 config: bool = True) -> Result:
        argv = [str(a) for a in args]
        if config:
            argv += ["--config", str(self.cfg)]
        return self.runner.invoke(cli, argv, input=input, env=env, catch_exceptions=False)

    def ok(self, *args: object, **kw) -> Result:
        result = self(*args, **kw)
        assert result.exit_code == 0, (result.exit_code, result.output)
        assert "Traceback" not in result.output
        return result

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def submit(self, path: Path | str, *extra: object, user: str = "u1", plan: str = "basic", **kw) -> Result:
        return self("submit", path, "--user", user, "--plan", plan, *extra, **kw)

    def status(self) -> dict:
        return json.loads(self.ok("status", "--json").stdout)

    def counts(self) -> dict[str, int]:
        return self.status()["jobs"]

    def total(self) -> int:
        return sum(self.counts().values())

    def job(self, job_id: int) -> dict:
        return json.loads(self.ok("jobs", "show", job_id).stdout)

    def limits(self) -> dict:
        return json.loads(self.ok("limits", "list", "--json").stdout)


@pytest.fixture
def cq(tmp_path: Path) -> Cq:
    return Cq(tmp_path)


def error_line(result: Result, code: int, *, stdout_empty: bool = True) -> str:
    """Assert a failure with exit `code` reported as one `cardq: ...` line on stderr, no traceback; return it."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cardq: "), lines[0]
    assert "internal error" not in lines[0]
    if stdout_empty:
        assert result.stdout == ""
    return lines[0]


def jsonl(*objs: dict) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def ids_of(result: Result) -> list[int]:
    return [int(line) for line in result.stdout.splitlines()]


@contextmanager
def store_db(path: Path) -> Iterator[Database]:
    db = Database.open(path)
    try:
        yield db
    finally:
        db.close()


def make_dead(db_path: Path, n: int) -> list[int]:
    """Claim n jobs and fail each permanently (straight to the dead-letter state) through the store API."""
    dead = []
    with store_db(db_path) as db:
        for _ in range(n):
            [job] = store_jobs.claim(db, "test-worker", lease_s=30)
            store_jobs.fail(db, job.id, job.token, "boom", permanent=True, backoff=store_jobs.Backoff())
            dead.append(job.id)
    return dead


def complete_all(db_path: Path, *, now: float | None = None) -> list[int]:
    """Claim every queued job and complete it (at `now`, default the real time)."""
    done = []
    with store_db(db_path) as db:
        while claimed := store_jobs.claim(db, "test-worker", lease_s=30, now=now):
            for job in claimed:
                store_jobs.complete(db, job.id, job.token, {"ok": job.id}, now=now)
                done.append(job.id)
    return done


# ------------------------------------------------------------------------------------------------------ help


def _walk(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(cli))
LEAVES = [(p, c) for p, c in COMMANDS if not isinstance(c, click.Group)]


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_the_walk_finds_every_command():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert names >= {"", "init", "submit", "status", "demo", "jobs", "jobs list", "jobs show", "jobs retry",
                     "jobs cancel", "jobs purge", "limits", "limits list", "limits set", "limits unset"}


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) or "cardq" for p, _ in COMMANDS])
def test_every_command_has_help(path, cmd, cq):
    assert cmd.help and cmd.help.strip(), f"{path} has no docstring"
    result = cq(*path, "--help", config=False)
    assert result.exit_code == 0, result.output
    usage = result.stdout.splitlines()[0]
    assert usage.startswith("Usage: ") and " ".join(path) in usage
    first_paragraph = cmd.help.strip().split("\n\n")[0]
    assert _squash(first_paragraph) in _squash(result.stdout)


def test_top_level_help_lists_the_exit_codes(cq):
    out = cq("--help", config=False).stdout
    assert "Exit codes:" in out
    for code, meaning in (("0", "success"), ("1", "any other failure"), ("2", "usage, config or input error"),
                          ("3", "rejected by a limit")):
        assert re.search(rf"^\s*{code}\s+{re.escape(meaning)}", out, re.MULTILINE), (code, out)


def test_version(cq):
    result = cq("--version", config=False)
    assert result.exit_code == 0
    assert re.search(r"\d+\.\d+\.\d+", result.stdout)


# ------------------------------------------------------------------------------------------------------ init


def test_init_writes_a_commented_config_and_creates_the_database(cq, tmp_path):
    result = cq("init", config=False)  # cwd is tmp_path: ./config.toml
    assert result.exit_code == 0, result.output
    cfg = tmp_path / "config.toml"
    assert "config: wrote config.toml" in result.stdout
    text = cfg.read_text()
    assert text == app.DEFAULT_CONFIG_TEXT()
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 10
    assert "[store]" in text and "[limits.daily]" in text
    db = tmp_path / "cardq.db"
    assert f"database: {db} ready (schema v{SCHEMA_VERSION})" in result.stdout
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA application_id").fetchall()[0][0] == APPLICATION_ID
        assert conn.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    finally:
        conn.close()


def test_init_twice_leaves_the_config_as_it_is(cq):
    cq.init()
    custom = "# my own settings\n[limits]\nbatch_max_items_per_request = 7\n"
    cq.cfg.write_text(custom)
    cq.ok("submit", cq.file("a.jsonl", jsonl({"a": 1})), "--user", "u", "--plan", "basic")
    result = cq.ok("init")
    assert f"config: {cq.cfg} exists, left as it is" in result.stdout
    assert cq.cfg.read_text() == custom
    assert cq.total() == 1  # the database was kept too
    assert cq.limits()["batch_max_items_per_request"] == {"value": 7, "source": "config", "configured": 7}


def test_init_creates_missing_folders(cq, tmp_path):
    cfg = tmp_path / "a" / "b" / "config.toml"
    result = cq("init", "--config", cfg, config=False)
    assert result.exit_code == 0, result.output
    assert cfg.is_file()
    assert (tmp_path / "a" / "b" / "cardq.db").is_file()


# ---------------------------------------------------------------------------------------------------- submit

ITEMS = [{"sku": "A-1", "title": "one"}, {"sku": "A-2", "title": "two"}, {"sku": "A-3", "title": "three"}]


def test_submit_jsonl_prints_ids_one_per_line(cq):
    cq.init()
    result = cq.ok("submit", cq.file("items.jsonl", jsonl(*ITEMS)), "--user", "u42", "--plan", "basic")
    assert result.stdout == "1\n2\n3\n"
    assert result.stderr == "submitted 3 jobs for u42\n"
    job = cq.job(2)
    assert job["payload"] == ITEMS[1]
    assert (job["user_id"], job["plan"], job["kind"], job["status"]) == ("u42", "basic", "card", "queued")
    assert cq.counts()["queued"] == 3


def test_submit_json_array(cq):
    cq.init()
    result = cq.ok("submit", cq.file("items.json", json.dumps(ITEMS, indent=2)), "--user", "u", "--plan", "free",
                   "--kind", "thumb", "--priority", "4")
    assert ids_of(result) == [1, 2, 3]
    job = cq.job(3)
    assert job["payload"] == ITEMS[2]
    assert (job["kind"], job["priority"], job["plan"]) == ("thumb", 4, "free")


def test_submit_csv_with_header(cq):
    cq.init()
    path = cq.file("items.csv", "sku,title,category\nC-1,Hat,clothing\nC-2,\"Pan, 28 cm\",\n")
    result = cq.ok("submit", path, "--user", "u", "--plan", "basic")
    assert ids_of(result) == [1, 2]
    assert cq.job(1)["payload"] == {"sku": "C-1", "title": "Hat", "category": "clothing"}
    assert cq.job(2)["payload"] == {"sku": "C-2", "title": "Pan, 28 cm"}  # empty cells are left out


def test_submit_from_stdin(cq):
    cq.init()
    result = cq.ok("submit", "-", "--user", "u", "--plan", "basic", input=jsonl(*ITEMS))
    assert ids_of(result) == [1, 2, 3]
    assert [cq.job(i)["payload"] for i in (1, 2, 3)] == ITEMS


def test_submit_quiet_prints_the_count(cq):
    cq.init()
    result = cq.ok("submit", cq.file("items.jsonl", jsonl(*ITEMS)), "--user", "u", "--plan", "basic", "--quiet")
    assert result.stdout == "3\n"
    assert cq.total() == 3


def test_submit_idempotency_key_resubmit_returns_the_same_ids(cq):
    cq.init()
    path = cq.file("items.jsonl", jsonl(*ITEMS))
    first = cq.ok("submit", path, "--user", "u", "--plan", "basic", "--idempotency-key-field", "sku")
    assert ids_of(first) == [1, 2, 3]
    again = cq.ok("submit", path, "--user", "u", "--plan", "basic", "--idempotency-key-field", "sku")
    assert ids_of(again) == [1, 2, 3]
    assert "submitted 0 jobs" in again.stderr and "3 already submitted" in again.stderr
    assert cq.total() == 3
    # one new key among known ones: only it is inserted, the others map to their jobs
    mixed = cq.file("mixed.jsonl", jsonl(ITEMS[2], {"sku": "A-4"}, ITEMS[0]))
    result = cq.ok("submit", mixed, "--user", "u", "--plan", "basic", "--idempotency-key-field", "sku")
    assert ids_of(result) == [3, 4, 1]
    assert cq.total() == 4
    # keys are per user: another user's same keys are new jobs
    other = cq.ok("submit", path, "--user", "v", "--plan", "basic", "--idempotency-key-field", "sku")
    assert ids_of(other) == [5, 6, 7]


def test_submit_idempotency_key_field_missing_from_an_item(cq):
    cq.init()
    path = cq.file("items.jsonl", jsonl(ITEMS[0], {"title": "no sku"}))
    line = error_line(cq.submit(path, "--idempotency-key-field", "sku"), 2)
    assert "items.jsonl line 2" in line and "'sku'" in line
    assert cq.total() == 0


BAD_INPUTS = [
    # id, file name (None: no file), content, extra args, fragments the one-line message must hold
    ("missing-file", "missing.jsonl", None, (), ("missing.jsonl", "no such file")),
    ("malformed-jsonl-line-3", "bad.jsonl", '{"a": 1}\n{"a": 2}\n{"a": \n{"a": 4}\n', (),
     ("bad.jsonl line 3", "invalid JSON", "expected one JSON object per line")),
    ("jsonl-line-is-an-array", "arr.jsonl", '{"a": 1}\n[1, 2]\n', (),
     ("arr.jsonl line 2", "a JSON array", "expected one JSON object per line")),
    ("json-array-item-not-object", "items.json", '[{"a": 1}, 2]', (),
     ("items.json item 2", "a JSON number", "expected a JSON object")),
    ("csv-wrong-field-count", "bad.csv", "sku,title\nA,one\nB,two,extra\n", (),
     ("bad.csv line 3", "3 fields", "expected 2")),
    ("unknown-plan", "ok.jsonl", '{"a": 1}\n', ("--plan", "gold"),
     ("unknown plan 'gold'", "expected one of: free, basic, professional, enterprise")),
    ("negative-priority", "ok.jsonl", '{"a": 1}\n', ("--priority", "-1"), ("--priority -1", "from 0 to")),
    ("empty-file", "empty.jsonl", "", (), ("empty.jsonl", "no items", "expected at least one")),
    ("blank-lines-only", "blank.jsonl", "\n  \n\n", (), ("blank.jsonl", "no items")),
    ("empty-csv", "empty.csv", "", (), ("empty.csv line 1", "no CSV header")),
    ("non-utf8", "latin1.jsonl", '{"title": "caf\xe9"}\n'.encode("latin-1"), (),
     ("latin1.jsonl", "not UTF-8", "expected JSONL, JSON or CSV in UTF-8")),
]


@pytest.mark.parametrize(("name", "content", "extra", "fragments"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_whole(cq, name, content, extra, fragments):
    cq.init()
    cq.ok("submit", cq.file("before.jsonl", jsonl({"x": 1}, {"x": 2})), "--user", "u1", "--plan", "basic")
    path = cq.tmp / name if content is None else cq.file(name, content)
    args = ["--user", "u1", "--plan", "basic", *extra]  # click: a later --plan wins
    line = error_line(cq("submit", path, *args), 2)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert cq.total() == 2
    # nothing was reserved either: the next job gets the next id
    assert ids_of(cq.ok("submit", cq.file("after.jsonl", jsonl({"x": 3})), "--user", "u1", "--plan", "basic")) \
        == [3]


def test_malformed_stdin_names_stdin_and_the_line(cq):
    cq.init()
    line = error_line(cq("submit", "-", "--user", "u", "--plan", "basic", input='{"a": 1}\n\n{oops}\n'), 2)
    assert "<stdin> line 3" in line
    assert cq.total() == 0


def test_payload_over_max_payload_bytes_is_refused_whole(cq):
    cq.init("[limits]\nmax_payload_bytes = 64\n")
    path = cq.file("big.jsonl", jsonl({"a": 1}, {"text": "x" * 100}, {"a": 3}))
    line = error_line(cq.submit(path), 2)
    size = len(json.dumps({"text": "x" * 100}, separators=(",", ":")))
    assert "big.jsonl line 2" in line
    assert f"payload is {size} bytes" in line and "max_payload_bytes is 64" in line
    assert cq.total() == 0
    small = cq.file("small.jsonl", jsonl({"text": "x" * 40}))  # 50 bytes: fits
    assert ids_of(cq.ok("submit", small, "--user", "u1", "--plan", "basic")) == [1]


# -------------------------------------------------------------------------------------------- database problems


def test_status_with_no_database_says_run_init(cq):
    cq.write_config("")
    line = error_line(cq("status"), 1)
    assert str(cq.db) in line and "no database" in line and "cardq init" in line
    assert not cq.db.exists()  # a read command does not create one


def test_no_config_and_no_database_in_cwd(cq, tmp_path):
    line = error_line(cq("status", config=False), 1)
    assert str(tmp_path / "cardq.db") in line and "cardq init" in line


def _sidecars(path: Path) -> list[Path]:
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")) if p.exists()]


@pytest.mark.parametrize("command", [("status",), ("init",), ("jobs", "list"), ("limits", "set", "daily.free", "9")])
def test_a_file_that_is_not_sqlite_is_refused_untouched(cq, command):
    target = cq.site / "notes.txt"
    cq.write_config('[store]\npath = "notes.txt"\n')
    original = b"these are my notes, not a database\n" * 20
    target.write_bytes(original)
    line = error_line(cq(*command), 1, stdout_empty=command != ("init",))
    assert str(target) in line and "not a SQLite database" in line
    assert target.read_bytes() == original
    assert _sidecars(target) == []


@pytest.mark.parametrize("command", [("status",), ("init",), ("limits", "set", "daily.free", "9")])
def test_a_sqlite_database_that_is_not_cardqs_is_refused_untouched(cq, command):
    target = cq.site / "other.db"
    cq.write_config('[store]\npath = "other.db"\n')
    conn = apsw.Connection(str(target))
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada'), ('grace')")
    conn.close()
    original = target.read_bytes()
    line = error_line(cq(*command), 1, stdout_empty=command != ("init",))
    assert str(target) in line and "not a cardq one" in line
    assert target.read_bytes() == original
    assert _sidecars(target) == []


def test_a_locked_database_fails_with_exit_1_and_inserts_nothing(cq):
    cq.init("[store]\nbusy_timeout_ms = 50\nbusy_retries = 2\n")
    path = cq.file("items.jsonl", jsonl(*ITEMS))
    holder = apsw.Connection(str(cq.db))
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        line = error_line(cq.submit(path), 1)
        assert time.monotonic() - started < 5  # bounded by busy_timeout_ms x busy_retries + backoff, not 5 s
        assert "locked" in line and str(cq.db) in line
        assert "2 attempts" in line
        assert cq.total() == 0  # WAL: reads still work while a writer holds the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert cq.total() == 0
    assert ids_of(cq.ok("submit", path, "--user", "u1", "--plan", "basic")) == [1, 2, 3]


def test_init_on_an_empty_foreign_sqlite_file_is_not_reported_ready(cq):
    target = cq.site / "cardq.db"
    cq.write_config("")
    conn = apsw.Connection(str(target))
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    init = cq("init")
    if init.exit_code == 0:  # acceptable only if the database is then usable
        cq.ok("status", "--json")
    else:
        error_line(init, 1, stdout_empty=False)


# ----------------------------------------------------------------------------------------------- config errors

BAD_CONFIGS = [
    ("unknown-key", '[store]\npth = "x.db"\n', ("unknown key store.pth", "expected one of: path, synchronous")),
    ("unknown-section", "[limitz]\nfree = 1\n", ("unknown key limitz", "expected one of: store, workers, limits")),
    ("wrong-type", '[store]\nbusy_timeout_ms = "fast"\n',
     ('store.busy_timeout_ms = "fast"', "expected an integer, got a string")),
    ("bool-for-int", "[workers]\ncount = true\n", ("workers.count = true", "expected an integer")),
    ("out-of-range-high", "[workers]\ncount = 999\n", ("workers.count = 999", "<= 256")),
    ("out-of-range-low", "[limits]\nmax_payload_bytes = 1\n", ("limits.max_payload_bytes = 1", ">= 2")),
    ("negative-daily", "[limits.daily]\nfree = -1\n", ("limits.daily.free = -1", ">= 0")),
    ("bad-enum", '[store]\nsynchronous = "sometimes"\n', ('store.synchronous = "sometimes"', '"normal" or "full"')),
    ("bad-timezone", '[limits]\ntimezone = "Mars/Base"\n', ('limits.timezone = "Mars/Base"', "IANA time zone")),
    ("invalid-toml", "[store\npath = 1\n", ("invalid TOML", "line 1")),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key_and_value(cq, text, fragments):
    cq.write_config(text)
    line = error_line(cq("status"), 2)
    assert str(cq.cfg) in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_missing_config_file(cq, tmp_path):
    line = error_line(cq("status", "--config", tmp_path / "nope.toml", config=False), 2)
    assert str(tmp_path / "nope.toml") in line and "not found" in line


def test_bad_config_string_with_a_newline_is_still_one_line(cq):
    cq.write_config('[store]\nsynchronous = "nor\\nmal"\n')
    line = error_line(cq("status"), 2)
    assert "store.synchronous" in line


def test_a_partial_daily_table_keeps_the_other_plans_defaults(cq):
    cq.init("[limits.daily]\nfree = 7\n")
    limits = cq.limits()
    assert limits["daily.free"]["value"] == 7
    assert limits["daily.basic"] == {"value": 20, "source": "default", "configured": 20}


# The commands that take --config, each with arguments that get it as far as loading the config.
CONFIGURED_COMMANDS = [
    ("init",),
    ("submit", "items.jsonl", "--user", "u", "--plan", "basic"),
    ("status",),
    ("jobs", "list"),
    ("jobs", "show", "1"),
    ("jobs", "retry", "1"),
    ("jobs", "cancel", "1"),
    ("jobs", "purge", "--older-than", "7d"),
    ("limits", "list"),
    ("limits", "set", "daily.free", "9"),
    ("limits", "unset", "daily.free"),
    ("systemd-unit",),
]


def test_every_command_but_demo_has_a_config_option():
    for path, cmd in LEAVES:
        if path == ("demo",):
            continue  # the demo writes its own config in --dir
        opts = {p.name: p for p in cmd.params}
        assert "config_path" in opts, path
        assert "--config" in opts["config_path"].opts and opts["config_path"].envvar == "CARDQ_CONFIG"


@pytest.mark.parametrize("command", CONFIGURED_COMMANDS, ids=[" ".join(c[:2]) for c in CONFIGURED_COMMANDS])
@pytest.mark.parametrize("via", ["--config", "CARDQ_CONFIG"])
def test_every_command_reads_the_given_config(cq, command, via):
    bad = cq.write_config("[store]\nbogus = 1\n")
    if via == "--config":
        result = cq(*command, "--config", bad, config=False)
    else:
        result = cq(*command, config=False, env={"CARDQ_CONFIG": str(bad)})
    line = error_line(result, 2, stdout_empty=command != ("init",))
    assert str(bad) in line and "unknown key store.bogus" in line


def test_cardq_config_env_is_honoured(cq, tmp_path):
    cq.init()
    (tmp_path / "config.toml").write_text("[store]\nbogus = 1\n")  # ./config.toml loses to CARDQ_CONFIG
    result = cq("status", "--json", config=False, env={"CARDQ_CONFIG": str(cq.cfg)})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["database"] == str(cq.db)
    assert data["config"]["file"] == str(cq.cfg)


def test_config_option_beats_cardq_config_env(cq, tmp_path):
    cq.init()
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nbogus = 1\n")
    result = cq("status", "--json", env={"CARDQ_CONFIG": str(bad)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["file"] == str(cq.cfg)


def test_cwd_config_toml_is_used_without_config_option(cq, tmp_path):
    (tmp_path / "config.toml").write_text("[limits]\nbatch_max_items_per_request = 9\n")
    cq.ok("init", config=False)
    data = json.loads(cq.ok("limits", "list", "--json", config=False).stdout)
    assert data["batch_max_items_per_request"] == {"value": 9, "source": "config", "configured": 9}
    assert (tmp_path / "cardq.db").is_file()


def test_bare_limits_honours_cardq_config(cq):
    cq.init("[limits]\nbatch_max_items_per_request = 9\n")
    result = cq("limits", config=False, env={"CARDQ_CONFIG": str(cq.cfg)})
    assert result.exit_code == 0, result.output
    assert f"(config: {cq.cfg})" in result.stdout


def test_bare_limits_takes_config_option(cq):
    cq.init("[limits]\nbatch_max_items_per_request = 9\n")
    result = cq("limits")
    assert result.exit_code == 0, result.output
    assert f"(config: {cq.cfg})" in result.stdout


# ---------------------------------------------------------------------------------------------------- limits


def test_limits_lists_every_limit_with_value_and_source(cq):
    cq.init("[limits]\nbatch_max_items_per_request = 50\n")
    cq.ok("limits", "set", "daily.free", "9")
    data = cq.limits()
    assert set(data) == set(ALL_LIMIT_KEYS)
    assert data["batch_max_items_per_request"] == {"value": 50, "source": "config", "configured": 50}
    assert data["batch_max_queued_per_user"] == {"value": 300, "source": "default", "configured": 300}
    assert data["daily.free"] == {"value": 9, "source": "override", "configured": 5}
    for text in (cq.ok("limits", "list").stdout, cq.ok("limits", "list", "--config", cq.cfg, config=False).stdout):
        rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:-1]}
        assert set(rows) == set(ALL_LIMIT_KEYS)
        assert rows["batch_max_items_per_request"] == ["50", "config", "50"]
        assert rows["max_payload_bytes"] == ["65536", "default", "65536"]
        assert rows["daily.free"] == ["9", "override", "5"]
        assert text.splitlines()[-1] == f"(config: {cq.cfg})"


def test_bare_limits_lists_them_too(cq, tmp_path):
    (tmp_path / "config.toml").write_text("[limits]\nbatch_max_items_per_request = 50\n")
    cq.ok("init", config=False)
    out = cq.ok("limits", config=False).stdout
    assert re.search(r"^batch_max_items_per_request\s+50\s+config\s+50$", out, re.MULTILINE)
    assert all(key in out for key in ALL_LIMIT_KEYS)


def test_limits_set_then_a_larger_batch_is_rejected_whole_and_unset_restores(cq):
    cq.init("[limits]\nbatch_max_items_per_request = 50\n")
    result = cq.ok("limits", "set", "batch_max_items_per_request", "2")
    assert "batch_max_items_per_request = 2" in result.stdout
    path = cq.file("three.jsonl", jsonl(*ITEMS))
    line = error_line(cq.submit(path), 3)
    assert "3 items" in line and "batch_max_items_per_request is 2" in line and "nothing was submitted" in line
    assert cq.total() == 0
    result = cq.ok("limits", "unset", "batch_max_items_per_request")
    assert result.stdout == "batch_max_items_per_request = 50 (config)\n"
    assert cq.limits()["batch_max_items_per_request"] == {"value": 50, "source": "config", "configured": 50}
    assert ids_of(cq.ok("submit", path, "--user", "u1", "--plan", "basic")) == [1, 2, 3]
    again = cq.ok("limits", "unset", "batch_max_items_per_request")
    assert "there was no override" in again.stdout


def test_limits_set_bad_key_lists_the_valid_keys(cq):
    cq.init()
    for command in (("limits", "set", "batch_size", "3"), ("limits", "unset", "batch_size")):
        line = error_line(cq(*command), 2)
        assert "unknown limit 'batch_size'" in line
        for key in ALL_LIMIT_KEYS:
            assert key in line, key
    line = error_line(cq("limits", "set", "daily.gold", "3"), 2)
    assert "daily.gold" in line and "[limits.daily]" in line
    assert all(v["source"] != "override" for v in cq.limits().values())


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("batch_max_items_per_request", "abc", "expected a whole number"),
    ("batch_max_items_per_request", "2.5", "expected a whole number"),
    ("batch_max_items_per_request", "0", "from 1 to"),
    ("max_payload_bytes", "1", "from 2 to"),
])
def test_limits_set_bad_value(cq, key, value, fragment):
    cq.init()
    line = error_line(cq("limits", "set", key, value), 2)
    assert f"limit {key} = " in line and value in line
    assert fragment in line
    assert cq.limits()[key]["source"] == "default"


def test_limits_set_negative_value(cq):
    cq.init()
    # `--` so click does not read -1 as an option
    line = error_line(cq("limits", "set", "--config", cq.cfg, "batch_max_items_per_request", "--", "-1",
                         config=False), 2)
    assert "batch_max_items_per_request = -1" in line and "from 1 to" in line
    # without `--` it is still a usage error (exit 2) and nothing changes
    assert cq("limits", "set", "batch_max_items_per_request", "-1").exit_code == 2
    assert cq.limits()["batch_max_items_per_request"]["source"] == "default"


def test_limits_set_zero_for_a_daily_plan_is_allowed(cq):
    cq.init()
    cq.ok("limits", "set", "daily.free", "0")
    line = error_line(cq.submit(cq.file("one.jsonl", jsonl({"a": 1})), plan="free"), 3)
    assert "plan free allows 0 a day" in line


def test_limits_set_negative_value_without_separator_is_one_line(cq):
    cq.init()
    line = error_line(cq("limits", "set", "batch_max_items_per_request", "-1"), 2)
    assert "from 1 to" in line


@pytest.mark.parametrize("command", [
    ("limits", "set", "batch_max_items_per_request", str(2**70)),
    ("submit", "one.jsonl", "--user", "u", "--plan", "basic", "--priority", str(2**70)),
    ("jobs", "show", str(2**70)),
    ("jobs", "cancel", str(2**70)),
])
def test_huge_integers_are_input_errors(cq, command):
    cq.init()
    cq.file("one.jsonl", jsonl({"a": 1}))
    line = error_line(cq(*command), 2)
    assert str(2**70) in line


def test_per_user_queued_limit(cq):
    cq.init()
    cq.ok("limits", "set", "batch_max_queued_per_user", "5")
    assert ids_of(cq.ok("submit", cq.file("four.jsonl", jsonl(*({"n": i} for i in range(4)))), "--user", "a",
                        "--plan", "basic")) == [1, 2, 3, 4]
    two = cq.file("two.jsonl", jsonl({"n": 10}, {"n": 11}))
    line = error_line(cq.submit(two, user="a"), 3)
    assert "too many requests" in line
    assert "user a has 4 jobs" in line and "adds 2" in line and "batch_max_queued_per_user is 5" in line
    assert cq.total() == 4
    assert ids_of(cq.ok("submit", two, "--user", "b", "--plan", "basic")) == [5, 6]
    # one more still fits for a (4 + 1 <= 5); finished jobs free the room
    assert ids_of(cq.ok("submit", cq.file("one.jsonl", jsonl({"n": 12})), "--user", "a", "--plan", "basic")) == [7]
    cq.ok("jobs", "cancel", 1)
    cq.ok("jobs", "cancel", 2)
    assert cq.submit(two, user="a").exit_code == 0
    assert cq.total() == 9


def test_daily_plan_limit_free_5_a_day(cq):
    cq.init()
    five = cq.file("five.jsonl", jsonl(*({"n": i} for i in range(5))))
    assert ids_of(cq.ok("submit", five, "--user", "f", "--plan", "free")) == [1, 2, 3, 4, 5]
    one = cq.file("one.jsonl", jsonl({"n": 9}))
    line = error_line(cq.submit(one, user="f", plan="free"), 3)
    assert "daily limit" in line and "adds 1" in line and "plan free allows 5 a day" in line
    assert cq.total() == 5
    # done today still counts against the day
    assert len(complete_all(cq.db)) == 5
    line = error_line(cq.submit(one, user="f", plan="free"), 3)
    assert "5 jobs done today" in line
    # another free user has their own 5; six at once is refused whole
    assert ids_of(cq.ok("submit", five, "--user", "g", "--plan", "free")) == [6, 7, 8, 9, 10]
    six = cq.file("six.jsonl", jsonl(*({"n": i} for i in range(6))))
    line = error_line(cq.submit(six, user="h", plan="free"), 3)
    assert "adds 6" in line
    assert cq.total() == 10


# ------------------------------------------------------------------------------------------------------ jobs


@pytest.fixture
def five_jobs(cq) -> Cq:
    """Users a (jobs 1-3) and b (jobs 4-5), plan basic."""
    cq.init()
    cq.ok("submit", cq.file("a.jsonl", jsonl(*ITEMS)), "--user", "a", "--plan", "basic")
    cq.ok("submit", cq.file("b.jsonl", jsonl({"sku": "B-1"}, {"sku": "B-2"})), "--user", "b", "--plan", "basic")
    return cq


def _list_ids(cq: Cq, *args: object) -> list[int]:
    return [row["id"] for row in json.loads(cq.ok("jobs", "list", "--json", *args).stdout)]


def test_jobs_list_filters(five_jobs):
    cq = five_jobs
    cq.ok("jobs", "cancel", 2)
    assert _list_ids(cq) == [5, 4, 3, 2, 1]  # newest first
    assert _list_ids(cq, "--user", "b") == [5, 4]
    assert _list_ids(cq, "--status", "cancelled") == [2]
    assert _list_ids(cq, "--status", "queued", "--user", "a") == [3, 1]
    assert _list_ids(cq, "--status", "dead") == []
    assert _list_ids(cq, "--limit", "2") == [5, 4]
    rows = json.loads(cq.ok("jobs", "list", "--json", "--user", "b").stdout)
    assert {r["user_id"] for r in rows} == {"b"} and "payload" not in rows[0]
    text = cq.ok("jobs", "list", "--user", "a").stdout.splitlines()
    assert text[0].split() == ["id", "user", "plan", "kind", "status", "attempts", "age", "last_error"]
    assert [line.split()[:5] for line in text[1:]] == [
        ["3", "a", "basic", "card", "queued"], ["2", "a", "basic", "card", "cancelled"],
        ["1", "a", "basic", "card", "queued"]]


def test_jobs_list_bad_status_is_a_usage_error(five_jobs):
    result = five_jobs("jobs", "list", "--status", "finished")
    assert result.exit_code == 2
    assert "finished" in result.stderr


def test_jobs_show(five_jobs):
    job = five_jobs.job(4)
    assert job["id"] == 4 and job["user_id"] == "b" and job["status"] == "queued"
    assert job["payload"] == {"sku": "B-1"}
    assert job["errors"] == [] and job["result"] is None


def test_jobs_show_unknown_id(five_jobs):
    line = error_line(five_jobs("jobs", "show", 999), 2)
    assert "job 999" in line and "no such job" in line


def test_jobs_cancel_twice(five_jobs):
    cq = five_jobs
    assert cq.ok("jobs", "cancel", 3).stdout == "job 3: cancelled (was queued)\n"
    assert cq.job(3)["status"] == "cancelled"
    line = error_line(cq("jobs", "cancel", 3), 2)
    assert "job 3 is cancelled" in line and "queued, scheduled, processing" in line
    line = error_line(cq("jobs", "cancel", 999), 2)
    assert "job 999" in line
    assert cq.counts() == {**dict.fromkeys(STATUSES, 0), "queued": 4, "cancelled": 1}


def test_jobs_retry_dead(five_jobs):
    cq = five_jobs
    dead = make_dead(cq.db, 3)
    assert sorted(_list_ids(cq, "--status", "dead")) == sorted(dead)
    assert cq.job(dead[0])["errors"][0]["error"] == "boom"
    result = cq.ok("jobs", "retry", "--dead", "--user", "nobody")
    assert result.stdout == "queued again: 0 jobs\n"
    result = cq.ok("jobs", "retry", "--dead")
    assert result.stdout == "queued again: 3 jobs\n"
    assert cq.counts()["dead"] == 0 and cq.counts()["queued"] == 5
    job = cq.job(dead[0])
    assert job["status"] == "queued" and job["attempts"] == 0
    assert job["errors"][0]["error"] == "boom"  # history kept


def test_jobs_retry_one(five_jobs):
    cq = five_jobs
    first, second = make_dead(cq.db, 2)
    assert cq.ok("jobs", "retry", first).stdout == "queued again: 1 job\n"
    assert cq.job(first)["status"] == "queued"
    assert cq.job(second)["status"] == "dead"
    line = error_line(cq("jobs", "retry", first), 2)
    assert f"job {first} is queued" in line and "dead, cancelled, scheduled" in line
    cq.ok("jobs", "cancel", first)
    assert cq.ok("jobs", "retry", first).stdout == "queued again: 1 job\n"  # cancelled jobs too
    line = error_line(cq("jobs", "retry", 999), 2)
    assert "job 999" in line and "no such job" in line


@pytest.mark.parametrize("args", [(), ("1", "--dead")], ids=["neither", "both"])
def test_jobs_retry_needs_an_id_or_dead(five_jobs, args):
    line = error_line(five_jobs("jobs", "retry", *args), 2)
    assert "JOB_ID or --dead" in line


def test_jobs_purge(five_jobs):
    cq = five_jobs
    eight_days_ago = time.time() - 8 * 86400
    with store_db(cq.db) as db:
        [old] = store_jobs.claim(db, "w", lease_s=30, now=eight_days_ago)
        store_jobs.complete(db, old.id, old.token, "ok", now=eight_days_ago)
        [recent] = store_jobs.claim(db, "w", lease_s=30)
        store_jobs.complete(db, recent.id, recent.token, "ok")
    result = cq.ok("jobs", "purge", "--older-than", "7d")
    assert result.stdout == "purged 1 jobs (done) finished more than 7d ago\n"
    error_line(cq("jobs", "show", old.id), 2)
    assert cq.job(recent.id)["status"] == "done"
    assert cq.counts()["done"] == 1 and cq.total() == 4
    assert cq.ok("jobs", "purge", "--older-than", "7d").stdout.startswith("purged 0 jobs")


def test_jobs_purge_dead_and_cancelled_only_when_asked(five_jobs):
    cq = five_jobs
    [dead] = make_dead(cq.db, 1)
    cq.ok("jobs", "cancel", 5)
    assert cq.ok("jobs", "purge", "--older-than", "0s").stdout.startswith("purged 0 jobs")
    result = cq.ok("jobs", "purge", "--older-than", "0", "--status", "dead", "--status", "cancelled")
    assert result.stdout.startswith("purged 2 jobs (dead, cancelled)")
    assert cq.total() == 3
    error_line(cq("jobs", "show", dead), 2)


@pytest.mark.parametrize("duration", ["soon", "7 days", "-1d", "7y", ""])
def test_jobs_purge_bad_duration(five_jobs, duration):
    line = error_line(five_jobs("jobs", "purge", "--older-than", duration), 2)
    assert f"duration {duration!r}" in line and "such as 7d" in line
    assert five_jobs.total() == 5


# ---------------------------------------------------------------------------------------------------- status


def test_status_table(five_jobs):
    cq = five_jobs
    cq.ok("jobs", "cancel", 1)
    out = cq.ok("status").stdout
    lines = out.splitlines()
    assert lines[0] == f"database  {cq.db}"
    digest = hashlib.sha256(cq.cfg.read_bytes()).hexdigest()[:12]
    assert lines[1] == f"config    {cq.cfg} ({digest})"
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] and line.split()[0] in STATUSES}
    assert set(rows) == set(STATUSES)
    assert rows["queued"] == ["4"] and rows["cancelled"] == ["1"] and rows["done"] == ["0"]
    assert "expired leases: 0" in out
    assert "limits in effect:" in out
    for key in ALL_LIMIT_KEYS:
        assert re.search(rf"^{re.escape(key)}\s+\d+\s+default$", out, re.MULTILINE), key
    assert re.search(r"^a\s+2\s+0$", out, re.MULTILINE) and re.search(r"^b\s+2\s+0$", out, re.MULTILINE)


def test_status_json(five_jobs):
    cq = five_jobs
    cq.ok("limits", "set", "daily.basic", "30")
    [dead] = make_dead(cq.db, 1)
    dead_user = cq.job(dead)["user_id"]
    data = cq.status()
    assert {"jobs", "users", "today", "limits", "expired_leases", "oldest_queued_age_s", "config"} <= set(data)
    assert data["jobs"] == {**dict.fromkeys(STATUSES, 0), "queued": 4, "dead": 1}
    expected = {"a": 3, "b": 2}
    expected[dead_user] -= 1
    assert {u["user_id"]: (u["queued"], u["processing"]) for u in data["users"]} == {
        user: (n, 0) for user, n in expected.items()}
    assert data["today"]["timezone"] == "UTC" and data["today"]["dead"] == 1
    assert data["today"]["failed_attempts"] == 1 and data["today"]["done"] == 0
    assert data["expired_leases"] == 0
    assert 0 <= data["oldest_queued_age_s"] < 600
    assert set(data["limits"]) == set(ALL_LIMIT_KEYS)
    assert data["limits"]["daily.basic"] == {"value": 30, "source": "override"}
    assert data["config"] == {"file": str(cq.cfg), "digest": hashlib.sha256(cq.cfg.read_bytes()).hexdigest()[:12],
                              "error": None}


def test_status_json_on_an_empty_database(cq):
    cq.init()
    data = cq.status()
    assert data["jobs"] == dict.fromkeys(STATUSES, 0)
    assert data["users"] == [] and data["oldest_queued_age_s"] is None


# ------------------------------------------------------------------------------------------------------ demo


def test_demo(cq, tmp_path):
    demo_dir = tmp_path / "demo-here"
    result = cq("demo", "--dir", demo_dir, config=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    rejected = [line for line in out.splitlines() if "REJECTED" in line]
    assert len(rejected) == 1 and "carol" in rejected[0] and "(exit code 3)" in rejected[0]
    assert "plan free allows 5 a day" in rejected[0]
    assert "== cardq status" in out
    assert re.search(r"^done\s+29$", out, re.MULTILINE) and re.search(r"^queued\s+0$", out, re.MULTILINE)
    assert "== a few generated cards" in out and "keywords:" in out
    assert (demo_dir / "config.toml").is_file() and (demo_dir / "cardq.db").is_file()
    assert not (tmp_path / "demo").exists()  # --dir was used, not ./demo
    # run again: a fresh database, same result
    again = cq("demo", "--dir", demo_dir, config=False)
    assert again.exit_code == 0 and re.search(r"^done\s+29$", again.stdout, re.MULTILINE)


def test_demo_with_non_utf8_items_is_an_input_error(cq, tmp_path):
    items = cq.file("latin1.jsonl", '{"sku": "caf\xe9"}\n'.encode("latin-1"))
    line = error_line(cq("demo", "--dir", tmp_path / "d", "--items", items, config=False), 2, stdout_empty=False)
    assert "latin1.jsonl" in line


# ---------------------------------------------------------------------------------- end to end (real script)


def _cardq_script() -> Path:
    script = Path(sys.executable).parent / "cardq"
    assert script.is_file(), f"console script not installed at {script}; pip install -e '.[test]'"
    return script


def _run(*args: object, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CARDQ_CONFIG", "CARDQ_DEBUG")}
    return subprocess.run([str(_cardq_script()), *map(str, args)], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)


def test_e2e_init_submit_status(tmp_path):
    init = _run("init", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "cardq.db").is_file()
    sub = _run("submit", "-", "--user", "u1", "--plan", "basic", "--idempotency-key-field", "sku", cwd=tmp_path,
               stdin=jsonl(*ITEMS))
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout == "1\n2\n3\n" and sub.stderr == "submitted 3 jobs for u1\n"
    again = _run("submit", "-", "--user", "u1", "--plan", "basic", "--idempotency-key-field", "sku",
                 cwd=tmp_path, stdin=jsonl(*reversed(ITEMS)))
    assert again.returncode == 0 and again.stdout == "3\n2\n1\n"
    status = _run("status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["jobs"]["queued"] == 3 and data["config"]["file"] == str(tmp_path / "config.toml")
    show = _run("jobs", "show", "2", cwd=tmp_path)
    assert show.returncode == 0 and json.loads(show.stdout)["payload"] == ITEMS[1]


def test_e2e_failures_are_one_line_with_their_exit_codes(tmp_path):
    nodb = _run("status", cwd=tmp_path)
    assert nodb.returncode == 1
    assert nodb.stderr.count("\n") == 1 and "cardq init" in nodb.stderr and "Traceback" not in nodb.stderr
    assert _run("init", cwd=tmp_path).returncode == 0
    assert _run("limits", "set", "batch_max_items_per_request", "2", cwd=tmp_path).returncode == 0
    limit = _run("submit", "-", "--user", "u", "--plan", "basic", cwd=tmp_path, stdin=jsonl(*ITEMS))
    assert limit.returncode == 3 and limit.stdout == ""
    assert limit.stderr.count("\n") == 1 and "batch_max_items_per_request is 2" in limit.stderr
    bad = _run("submit", "-", "--user", "u", "--plan", "basic", cwd=tmp_path, stdin='{"a": 1}\n{"a"\n')
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "<stdin> line 2" in bad.stderr
    (tmp_path / "config.toml").write_text("[workers]\ncount = -1\n")
    cfg = _run("status", cwd=tmp_path)
    assert cfg.returncode == 2
    assert cfg.stderr.count("\n") == 1 and "workers.count = -1" in cfg.stderr and "Traceback" not in cfg.stderr


@pytest.mark.parametrize("user", ["evil\nu42 999", "\x1b[31mred", "tab\there", "a b", "\u202eright-to-left", ""])
def test_user_ids_that_could_forge_output_are_refused(cq, user):
    cq.init()
    items = cq.file("one.jsonl", b'{"title": "x"}\n')
    line = error_line(cq("submit", items, "--user", user, "--plan", "basic"), 2)
    assert "expected 1 to 200 printable characters" in line


def test_control_characters_in_tables_are_shown_escaped():
    from cardq import render

    out = render.job_table([{"id": 1, "user_id": "evil\nu42 999\x1b[2J", "plan": "basic", "kind": "card",
                             "status": "queued", "attempts": 0, "max_attempts": 5, "priority": 0,
                             "created_at": 0.0, "last_error": None, "updated_at": 0.0, "finished_at": None,
                             "started_at": None, "run_at": 0.0, "lease_owner": None, "lease_until": None,
                             "idempotency_key": None}])
    assert len(out.splitlines()) == 2 and "\\n" in out and "\x1b" not in out and "\\x1b[2J" in out
