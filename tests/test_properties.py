"""Property-based tests (hypothesis) for submit parsing, the job state machine and fair share.

1. cardq.inputs.parse_items round-trips JSONL, JSON arrays and CSV, names the right line/item in `where`, names
   the right line when one JSONL line is bad, and takes --idempotency-key-field values only when usable.
2. A RuleBasedStateMachine drives store.submit / store.jobs (claim, finish_and_claim, complete, complete_many,
   fail, extend, extend_owned, recover, recover_orphans, give_back, release_owner) / store.admin (cancel, retry)
   against a real SQLite file with an injected clock, keeps a model of every job, and checks the database
   against it after every step; plus focused checks of the daily counter and of usage.DayClock.
3. Fair share (store/fairness.py): with every batch submitted before the first claim, claims proceed in rounds.

No pytest fixtures inside hypothesis tests: each example makes (and removes) its own temp folder.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import math
import random
import shutil
import tempfile
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cardq.config import load_config
from cardq.errors import InputError, InvalidTransition, JobNotFound, LeaseLost
from cardq.inputs import parse_items
from cardq.store import Database, admin, jobs, queries, totals, usage
from cardq.store import submit as submit_mod
from cardq.store.schema import ACTIVE_STATUSES, STATUSES

# Every limit so high that only the test's own logic decides.
UNLIMITED = {key: (10**9, "config") for key in load_config(None).limit_values()}


def _same(a: object, b: object) -> bool:
    """JSON equality that also tells 1 from 1.0 from True, -0.0 from 0.0, and keeps key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# 1. Submit parsing
# ---------------------------------------------------------------------------------------------------------------

_TRICKY = 'a,"\'\n\r\t\\ {}[]:;é€\u2028\u2029\x85\x00\x1e\U0001f600'
_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),  # no lone surrogates: not encodable
    st.text(st.sampled_from(_TRICKY), max_size=8),
)
# orjson reads integers in [-2**63, 2**64 - 1] exactly (outside it they silently become floats).
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), _text,
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=10,
)
_json_objects = st.dictionaries(_text, _json_values, max_size=5)
_blank_lines = st.lists(st.sampled_from(["", " ", "\t", "  \t "]), max_size=2)


@st.composite
def jsonl_documents(draw, objects=_json_objects):
    """(objects, text, line number of each object) for a JSONL file with blank lines sprinkled in."""
    objs = draw(st.lists(objects, min_size=1, max_size=8))
    ensure_ascii = draw(st.booleans())
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    lines: list[str] = []
    linenos: list[int] = []
    for obj in objs:
        lines.extend(draw(_blank_lines))
        indent = draw(st.sampled_from(["", " ", "\t"]))
        lines.append(indent + json.dumps(obj, ensure_ascii=ensure_ascii, separators=separators))
        linenos.append(len(lines))
    lines.extend(draw(_blank_lines))
    text = eol.join(lines) + draw(st.sampled_from(["", eol]))
    return objs, text, linenos


@settings(max_examples=75, deadline=None)
@given(jsonl_documents(), st.sampled_from(["items.jsonl", "items.ndjson", "-"]))
def test_jsonl_round_trip(doc, name):
    objs, text, linenos = doc
    items = parse_items(text, name)  # "-": detected from the first non-blank character
    assert len(items) == len(objs)
    for item, obj, lineno in zip(items, objs, linenos, strict=True):
        assert _same(orjson.loads(item.payload), obj)
        assert item.where == f"{name} line {lineno}"
        assert item.idempotency_key is None


@settings(max_examples=75, deadline=None)
@given(st.lists(_json_objects, min_size=1, max_size=8), st.sampled_from([None, 0, 2]), st.booleans(),
       st.sampled_from(["items.json", "-"]))
def test_json_array_round_trip(objs, indent, ensure_ascii, name):
    text = json.dumps(objs, indent=indent, ensure_ascii=ensure_ascii)
    items = parse_items(text, name)
    assert len(items) == len(objs)
    for n, (item, obj) in enumerate(zip(items, objs, strict=True), 1):
        assert _same(orjson.loads(item.payload), obj)
        assert item.where == f"{name} item {n}"


BAD_LINES = ['{"a": ', "[1,2]", '"str"', "42", "null", "true", '{"a":1}}', "{'a': 1}", "nope", '{"a":1,}', "{"]


@settings(max_examples=75, deadline=None)
@given(jsonl_documents(), st.data())
def test_jsonl_bad_line_is_named(doc, data):
    objs, text, _ = doc
    lines = text.split("\n")
    pos = data.draw(st.integers(0, len(lines) - 1), label="insert before line index")
    bad = data.draw(st.sampled_from(BAD_LINES), label="bad line")
    lines.insert(pos, bad)
    with pytest.raises(InputError) as info:
        parse_items("\n".join(lines), "items.jsonl")
    # Every other non-blank line is a valid object, so the first bad line is the inserted one.
    assert f"items.jsonl line {pos + 1}:" in str(info.value)
    assert str(info.value).startswith(f"items.jsonl line {pos + 1}: ")


@settings(max_examples=40, deadline=None)
@given(st.lists(_json_objects, min_size=1, max_size=6), st.data())
def test_json_array_non_object_item_is_named(objs, data):
    n = data.draw(st.integers(0, len(objs)), label="index")
    bad = data.draw(st.sampled_from([[1, 2], "str", 3, None, True, 1.5]), label="bad item")
    arr = [*objs[:n], bad, *objs[n:]]
    with pytest.raises(InputError) as info:
        parse_items(json.dumps(arr), "items.json")
    assert str(info.value).startswith(f"items.json item {n + 1}: ")


_key_values = st.one_of(_text.filter(bool), st.integers(-(2**63), 2**64 - 1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_json_objects, _key_values), min_size=1, max_size=6))
def test_idempotency_key_field(pairs):
    """--idempotency-key-field: a string or whole-number field becomes the item's key, as text."""
    objs = [{**obj, "id": value} for obj, value in pairs]
    items = parse_items("\n".join(json.dumps(o) for o in objs), "items.jsonl", key_field="id")
    assert [item.idempotency_key for item in items] == [str(value) for _, value in pairs]
    assert all(_same(orjson.loads(item.payload), obj) for item, obj in zip(items, objs, strict=True))


# True/False: a JSON boolean is neither a string nor a number, though Python's bool is an int (this test found
# cardq/inputs.py keying such an item 'True'; fixed since).
_BAD_KEYS = [None, "", 1.5, 2.0, [1], {"a": 1}, True, False]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_json_objects, _key_values), min_size=1, max_size=6), st.data())
def test_idempotency_key_field_refuses_missing_or_unusable_values(pairs, data):
    objs = [{**obj, "id": value} for obj, value in pairs]
    n = data.draw(st.integers(0, len(objs)), label="position")
    bad = data.draw(st.one_of(st.none(), st.sampled_from(range(len(_BAD_KEYS)))), label="bad value (None: no field)")
    objs.insert(n, {"x": 1} if bad is None else {"x": 1, "id": _BAD_KEYS[bad]})
    with pytest.raises(InputError) as info:
        parse_items("\n".join(json.dumps(o) for o in objs), "items.jsonl", key_field="id")
    assert str(info.value).startswith(f"items.jsonl line {n + 1}: ")
    assert "'id'" in str(info.value)


_csv_names = st.lists(_text.map(str.strip).filter(bool), min_size=1, max_size=5, unique=True)
_csv_values = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),
    st.text(st.sampled_from(_TRICKY), min_size=1, max_size=8),
)


def _line_count(text: str) -> int:
    """Physical lines as csv.reader over StringIO(newline='') counts them (\\r\\n, \\r and \\n all end one)."""
    return len(io.StringIO(text, newline="").readlines())


@st.composite
def csv_documents(draw):
    """(header, rows, text, (first line, last line) of each row) written by the csv module; some cells empty."""
    header = draw(_csv_names)
    cell = st.one_of(st.just(""), _csv_values)
    rows = draw(st.lists(st.lists(cell, min_size=len(header), max_size=len(header)), max_size=8))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    spans = []
    for row in rows:
        first = _line_count(buf.getvalue()) + 1
        writer.writerow(row)
        spans.append((first, _line_count(buf.getvalue())))
    return header, rows, buf.getvalue(), spans


def _csv_expected(header, rows, spans):
    """Rows whose cells are all empty or whitespace are skipped as blank lines; empty cells are left out."""
    return [
        ({h: v for h, v in zip(header, row, strict=True) if v != ""}, span)
        for row, span in zip(rows, spans, strict=True)
        if any(v.strip() for v in row)
    ]


# The example is the minimal one hypothesis found when cardq/inputs.py still named a record by csv.reader.line_num,
# i.e. by its LAST physical line ("items.csv line 3" for a record starting on line 2); fixed since.
@settings(max_examples=150, deadline=None)
@example(doc=(["0"], [["0\n"]], '0\r\n"0\n"\r\n', [(2, 3)]), name="items.csv")
@given(csv_documents(), st.sampled_from(["items.csv", "-"]))
def test_csv_round_trip(doc, name):
    header, rows, text, spans = doc
    if name == "-" and text.lstrip()[:1] in ("[", "{"):
        name = "items.csv"  # auto-detection would (rightly) read it as JSON
    expected = _csv_expected(header, rows, spans)
    if not expected:
        with pytest.raises(InputError, match="no items"):
            parse_items(text, name)
        return
    items = parse_items(text, name)
    assert len(items) == len(expected)
    for item, (obj, (first, _last)) in zip(items, expected, strict=True):
        assert _same(orjson.loads(item.payload), obj)
        assert item.where == f"{name} line {first}"  # a record spanning lines is named by the line it starts on


# ---------------------------------------------------------------------------------------------------------------
# 2. The job state machine against a real SQLite file
# ---------------------------------------------------------------------------------------------------------------

USERS = ("alice", "bob", "carol")
# Owner names as the supervisor makes them, "<run>/<worker>", so recover_orphans has runs to tell apart.
OWNERS = ("run1/w1", "run2/w1")
KEYS = ("k1", "k2", "k3")
BACKOFF = jobs.Backoff(base_s=1, max_s=5)
# Not UTC, so a day computed in the wrong zone shows; and one whose DST starts AT midnight: 2023-09-02 23:59:59
# -04 is followed by 2023-09-03 01:00:00 -03, so local midnight never happens (the day cache, usage.DayClock,
# must still roll over).
TIMEZONE = "America/Santiago"
# 20 s before that missing midnight, so the clock crosses days within a few steps.
START = 1_693_713_600.0 - 20
PROCESSING_TIMEOUT_S = 10.0**9  # only expired leases are recovered
# Handler results: any JSON (big integers, floats, unicode, nesting), kept small so drawing them stays cheap.
_results = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=4,
)


@dataclass
class Model:
    user: str
    priority: int
    max_attempts: int
    status: str = "queued"
    attempts: int = 0
    owner: str | None = None
    token: int | None = None
    lease_until: float | None = None
    run_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    failures: int = 0  # failed attempts ever recorded (fail or recover); the history keeps the newest 25
    kills: int = 0  # attempts that ended with their worker dying (release_owner killed=True)
    result: object = None  # the handler's return value, once done


def _snapshot(db: Database):
    def tx(c):
        return tuple(
            c.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("jobs", "user_load", "daily_stats", "sched", "limits", "job_totals")
        )

    return db.read(tx, "snapshot")


class JobMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="cardq-props-")
        self.db = Database.open(Path(self.tmp) / "cardq.db", create=True, timezone=TIMEZONE)
        self.now = START
        self.rng = random.Random(1234)
        self.jobs: dict[int, Model] = {}
        self.keys: dict[tuple[str, str], int] = {}
        self.issued: list[tuple[int, int]] = []  # every (job id, token) a claim ever handed out
        self.failed_by_day: dict[str, list[int]] = {}  # day -> [failed attempts, dead jobs]
        self.claims = 0  # jobs every claim handed out (what the totals' derived "claimed" must say)

    def teardown(self):
        self.db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _valid(self, job_id: int, token: int) -> bool:
        m = self.jobs.get(job_id)
        return m is not None and m.status == "processing" and m.token == token

    def _unchanged(self, exc: type[Exception], fn) -> Exception:
        before = _snapshot(self.db)
        with pytest.raises(exc) as info:
            fn()
        assert _snapshot(self.db) == before, f"{exc.__name__} raised, but the database changed"
        return info.value

    def _release(self, m: Model) -> None:
        m.owner = m.token = m.lease_until = None

    def _count_failure(self, dead: bool) -> None:
        day = usage.day_key(self.now, self.db.tz)
        counts = self.failed_by_day.setdefault(day, [0, 0])
        counts[0] += 1
        counts[1] += dead

    def _failed_attempt(self, m: Model, *, dead: bool, run_at: float | None = None,
                        status: str = "queued") -> None:
        """A held job's attempt failed (fail, recover, release_owner, recover_orphans): dead, or back to run."""
        self._release(m)
        if dead:
            m.status, m.finished_at = "dead", self.now
        else:
            m.status, m.run_at = status, self.now if run_at is None else run_at
        m.failures += 1
        self._count_failure(dead)

    def _check_backoff(self, m: Model, out: jobs.FailOutcome) -> None:
        assert out.status in ("scheduled", "queued")
        delay = out.run_at - self.now
        assert 0 <= delay <= min(BACKOFF.max_s, BACKOFF.base_s * 2 ** (m.attempts - 1)) + 1e-6
        # scheduled when there is a delay, queued (runnable now) when there is none; a delay too small to change
        # `now` in floating point may still say scheduled.
        assert out.status == ("scheduled" if delay > 0 else "queued") or out.run_at == self.now

    def _pick_pair(self, data) -> tuple[int, int]:
        """Mostly a (job, token) held now; else the token of a job since done (completing it again must change
        nothing), one handed out earlier (maybe stale now), or a forged token for a job."""
        held = sorted((i, m.token) for i, m in self.jobs.items() if m.status == "processing")
        done = [p for p in self.issued if self.jobs[p[0]].status == "done"]
        kind = data.draw(st.sampled_from(["held", "held", "done", "issued", "forged"]), label="which pair")
        if kind == "held" and held:
            return data.draw(st.sampled_from(held), label="held pair")
        if kind == "done" and done:
            return data.draw(st.sampled_from(done), label="pair of a done job")
        if kind != "forged":
            return data.draw(st.sampled_from(self.issued), label="issued pair")
        job_id = data.draw(st.sampled_from(sorted(self.jobs)), label="job for a forged token")
        return job_id, data.draw(st.integers(1, 2**62), label="forged token")

    def _pick_id(self, data, prefer: tuple[str, ...]) -> int:
        """Mostly a job in one of the `prefer` statuses; else any job, or any id (which may not exist)."""
        preferred = sorted(i for i, m in self.jobs.items() if m.status in prefer)
        kind = data.draw(st.sampled_from(["preferred", "preferred", "existing", "any"]), label="which id")
        if kind == "preferred" and preferred:
            return data.draw(st.sampled_from(preferred), label="job id")
        if kind != "any" and self.jobs:
            return data.draw(st.sampled_from(sorted(self.jobs)), label="job id")
        return data.draw(st.integers(0, max(self.jobs, default=0) + 1), label="any job id")

    # -- rules --------------------------------------------------------------------------------------------------

    @initialize(
        offset=st.floats(0, 40),
        batches=st.lists(st.tuples(st.sampled_from(USERS), st.integers(1, 4), st.integers(0, 2)), max_size=3),
    )
    def start(self, offset, batches):
        """Start the clock somewhere before local midnight, and (usually) with some jobs already queued."""
        self.now = START + offset
        for user, n, priority in batches:
            self._submit(user, [None] * n, priority, max_attempts=2)

    @rule(seconds=st.one_of(st.floats(0, 8), st.sampled_from([0.0, 3600.0, 43200.0, 86400.0])))
    def advance_clock(self, seconds):
        self.now += seconds

    @rule(
        user=st.sampled_from(USERS),
        keys=st.lists(st.one_of(st.none(), st.sampled_from(KEYS)), min_size=1, max_size=5),
        priority=st.integers(0, 2),
        max_attempts=st.integers(1, 3),
    )
    def submit(self, user, keys, priority, max_attempts):
        self._submit(user, keys, priority, max_attempts)

    def _submit(self, user, keys, priority, max_attempts):
        items = [submit_mod.NewJob(orjson.dumps({"n": n, "key": key}), key) for n, key in enumerate(keys)]
        next_id = max(self.jobs, default=0) + 1
        expected, fresh, first_in_batch = [], [], {}
        for key in keys:
            if key is not None and (user, key) in self.keys:
                expected.append(self.keys[(user, key)])
            elif key is not None and key in first_in_batch:
                expected.append(first_in_batch[key])
            else:
                expected.append(next_id)
                fresh.append(next_id)
                if key is not None:
                    first_in_batch[key] = next_id
                next_id += 1
        res = submit_mod.submit(self.db, items, user_id=user, plan="free", priority=priority,
                                max_attempts=max_attempts, configured=UNLIMITED, now=self.now)
        assert res.ids == expected
        assert (res.created, res.existing) == (len(fresh), len(keys) - len(fresh))
        for job_id in fresh:
            self.jobs[job_id] = Model(user, priority, max_attempts)
        for key, job_id in first_in_batch.items():
            self.keys[(user, key)] = job_id

    @precondition(lambda self: any(m.status in ("queued", "scheduled") for m in self.jobs.values()))
    @rule(data=st.data(), owner=st.sampled_from(OWNERS), k=st.integers(1, 3), lease_s=st.floats(0.5, 5),
          with_results=st.booleans())
    def claim(self, data, owner, k, lease_s, with_results):
        """claim(k), or finish_and_claim(): a worker's finished jobs and its next claim in one transaction."""
        runnable = self.db.read(lambda c: c.execute(
            "SELECT id, priority, vt FROM jobs WHERE status = 'queued' OR (status = 'scheduled' AND run_at <= ?)",
            (self.now,)).fetchall())
        order = [r[0] for r in sorted(runnable, key=lambda r: (-r[1], r[2], r[0]))]
        # The model agrees on which jobs are runnable.
        assert sorted(order) == sorted(
            i for i, m in self.jobs.items()
            if m.status == "queued" or (m.status == "scheduled" and m.run_at <= self.now))
        if with_results and self.issued:
            triples, results = self._draw_done(data)
            lost, got = jobs.finish_and_claim(self.db, triples, owner, k=k, lease_s=lease_s, now=self.now)
            self._check_done(triples, results, lost)
        else:
            got = jobs.claim(self.db, owner, k=k, lease_s=lease_s, now=self.now)
        assert [c.id for c in got] == order[:k], "claim did not take the first k jobs in claim order"
        for m in self.jobs.values():
            if m.status == "scheduled" and m.run_at <= self.now:
                m.status = "queued"  # promoted in the claim's transaction
        assert len({c.token for c in got}) <= 1
        for c in got:
            m = self.jobs[c.id]
            assert m.status == "queued", f"job {c.id} handed out while {m.status}"  # never to two owners
            assert (c.user_id, c.max_attempts, c.attempt) == (m.user, m.max_attempts, m.attempts + 1)
            assert c.lease_until == self.now + lease_s
            m.status, m.attempts, m.owner, m.token, m.lease_until, m.started_at = (
                "processing", m.attempts + 1, owner, c.token, self.now + lease_s, self.now)
            self.issued.append((c.id, c.token))
        self.claims += len(got)

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), many=st.booleans())
    def complete(self, data, many):
        """complete() one job, or complete_many() a batch, with a held, stale, done or forged token."""
        if many:
            self._complete_many(data)
        else:
            self._complete_one(data)

    def _complete_one(self, data):
        job_id, token = self._pick_pair(data)
        result = data.draw(_results, label="result")
        if self._valid(job_id, token):
            jobs.complete(self.db, job_id, token, result, now=self.now)
            m = self.jobs[job_id]
            m.status, m.finished_at, m.result = "done", self.now, result
            self._release(m)
        else:
            self._unchanged(LeaseLost, lambda: jobs.complete(self.db, job_id, token, result, now=self.now))

    def _complete_many(self, data):
        triples, results = self._draw_done(data)
        if not results:
            before = _snapshot(self.db)
        lost = jobs.complete_many(self.db, triples, now=self.now)
        if not results:
            assert _snapshot(self.db) == before
        self._check_done(triples, results, lost)

    def _draw_done(self, data) -> tuple[list[tuple[int, int, object]], dict[int, list[object]]]:
        """A batch of (job, token, result) for complete_many / finish_and_claim, and for each job that one of
        its entries holds, the results it may end up with."""
        batch = data.draw(st.integers(1, 4), label="batch size")
        triples = [(*self._pick_pair(data), data.draw(_results, label="result")) for _ in range(batch)]
        results: dict[int, list[object]] = {}
        for job_id, token, result in triples:
            if self._valid(job_id, token):
                results.setdefault(job_id, []).append(result)
        return triples, results

    def _check_done(self, triples, results, lost) -> None:
        """Every job with at least one entry holding its lease is done exactly once, with one of those entries'
        results; the others are lost: one entry per item of the batch, so a job named twice without a valid
        token is listed twice. (A job named twice with its valid token is done once and not lost.)"""
        assert lost == [job_id for job_id, _, _ in triples if job_id not in results]
        for job_id, candidates in results.items():
            stored = queries.get(self.db, job_id)["result"]
            assert any(_same(stored, r) for r in candidates), (stored, candidates)
            m = self.jobs[job_id]
            m.status, m.finished_at, m.result = "done", self.now, stored
            self._release(m)

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), permanent=st.booleans())
    def fail(self, data, permanent):
        job_id, token = self._pick_pair(data)
        if not self._valid(job_id, token):
            self._unchanged(LeaseLost, lambda: jobs.fail(self.db, job_id, token, "stale", permanent=permanent,
                                                         backoff=BACKOFF, rng=self.rng, now=self.now))
            return
        m = self.jobs[job_id]
        out = jobs.fail(self.db, job_id, token, "boom\n" * 200, permanent=permanent, backoff=BACKOFF,
                        rng=self.rng, now=self.now)
        if permanent or m.attempts >= m.max_attempts:
            assert (out.status, out.run_at) == ("dead", None)
            self._failed_attempt(m, dead=True)
        else:
            self._check_backoff(m, out)
            self._failed_attempt(m, dead=False, run_at=out.run_at, status=out.status)

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), by_owner=st.booleans(), lease_s=st.floats(0.5, 5))
    def renew(self, data, by_owner, lease_s):
        """A worker extends the leases it holds, or the supervisor renews all of its live workers' leases."""
        if by_owner:
            self._extend_owned(data.draw(st.lists(st.sampled_from(OWNERS), max_size=2, unique=True)), lease_s)
        else:
            self._extend(data, lease_s)

    def _extend(self, data, lease_s):
        held = sorted((i, m.token) for i, m in self.jobs.items() if m.status == "processing")
        pairs = data.draw(st.lists(st.sampled_from(held + self.issued), min_size=1, max_size=4, unique=True))
        expected = {j for j, t in pairs if self._valid(j, t)}
        assert jobs.extend(self.db, pairs, lease_s=lease_s, now=self.now) == expected
        for job_id in expected:
            self.jobs[job_id].lease_until = self.now + lease_s

    def _extend_owned(self, owners, lease_s):
        """The supervisor renews every lease its live workers hold."""
        held = [m for m in self.jobs.values() if m.status == "processing" and m.owner in owners]
        assert jobs.extend_owned(self.db, owners, lease_s=lease_s, now=self.now) == len(held)
        for m in held:
            m.lease_until = self.now + lease_s

    @precondition(lambda self: any(m.status == "processing" for m in self.jobs.values()))
    @rule(data=st.data(), orphans=st.booleans())
    def take_back(self, data, orphans):
        """recover() expired leases (and, with a short processing timeout, hung jobs), or recover_orphans()."""
        if orphans:
            self._recover_orphans(data.draw(st.sampled_from(["run1/", "run2/", "run3/"]), label="current run"))
        else:
            self._recover(data.draw(st.sampled_from([PROCESSING_TIMEOUT_S, 6.0]), label="processing timeout"))

    def _recover(self, timeout):
        expired = sorted(
            i for i, m in self.jobs.items()
            if m.status == "processing" and (m.lease_until < self.now or m.started_at < self.now - timeout))
        out = jobs.recover(self.db, processing_timeout_s=timeout, now=self.now)
        dead = 0
        for job_id in expired:
            m = self.jobs[job_id]
            dead += m.attempts >= m.max_attempts
            self._failed_attempt(m, dead=m.attempts >= m.max_attempts)
        assert (out.requeued, out.dead) == (len(expired) - dead, dead)

    def _recover_orphans(self, current):
        """A new supervisor run takes back every job a previous run's workers still hold."""
        orphans = sorted(i for i, m in self.jobs.items()
                         if m.status == "processing" and not m.owner.startswith(current))
        out = jobs.recover_orphans(self.db, owner_prefix="run", current_prefix=current, now=self.now)
        dead = 0
        for job_id in orphans:
            m = self.jobs[job_id]
            dead += m.attempts >= m.max_attempts
            self._failed_attempt(m, dead=m.attempts >= m.max_attempts)
        assert (out.requeued, out.dead) == (len(orphans) - dead, dead)

    @precondition(lambda self: self.issued)
    @rule(data=st.data(), release=st.booleans())
    def worker_exit(self, data, release):
        """A worker stops: it gives back its prefetched jobs, or the supervisor releases all it held."""
        if release:
            busy = sorted({m.owner for m in self.jobs.values() if m.status == "processing"})
            owner = data.draw(st.sampled_from(busy) if busy and data.draw(st.booleans()) else st.sampled_from(OWNERS),
                              label="owner")
            self._release_owner(data, owner, killed=data.draw(st.booleans(), label="killed"),
                                poison_kills=data.draw(st.integers(1, 3), label="poison_kills"))
        else:
            self._give_back(data)

    def _give_back(self, data):
        """A worker's prefetched, never started jobs go back to queued; the attempt is not counted."""
        held = sorted((i, m.token) for i, m in self.jobs.items() if m.status == "processing")
        pairs = data.draw(st.lists(st.sampled_from(held + self.issued), min_size=1, max_size=3, unique=True))
        expected = 0
        for job_id, token in pairs:
            if self._valid(job_id, token):
                m = self.jobs[job_id]
                self._release(m)
                m.status, m.attempts = "queued", max(m.attempts - 1, 0)
                expected += 1
        assert jobs.give_back(self.db, pairs, now=self.now) == expected

    def _release_owner(self, data, owner, killed, poison_kills):
        """A worker died or stopped: its running job fails its attempt (a kill counts toward poison), every
        other job it held goes back as if never claimed."""
        held = sorted(i for i, m in self.jobs.items() if m.status == "processing" and m.owner == owner)
        # The running job: one it holds, none, or (a supervisor's stale idea) any job at all.
        kind = data.draw(st.sampled_from(["held", "held", "none", "any"]), label="running job is")
        running = None
        if kind == "held" and held:
            running = data.draw(st.sampled_from(held), label="running job")
        elif kind == "any":
            running = data.draw(st.sampled_from(sorted(self.jobs) or [0]), label="running job")
        out = jobs.release_owner(self.db, owner, running=running, error="worker exited 1", killed=killed,
                                 poison_kills=poison_kills, backoff=BACKOFF, rng=self.rng, now=self.now)
        assert out.given_back == len(held) - (running in held)
        assert (out.failed is None) == (running not in held)
        for job_id in held:
            m = self.jobs[job_id]
            if job_id != running:
                self._release(m)
                m.status, m.attempts = "queued", max(m.attempts - 1, 0)
                continue
            m.kills += killed
            poison = killed and m.kills >= poison_kills
            if poison or m.attempts >= m.max_attempts:
                assert (out.failed.status, out.failed.run_at) == ("dead", None)
                self._failed_attempt(m, dead=True)
            else:
                self._check_backoff(m, out.failed)
                self._failed_attempt(m, dead=False, run_at=out.failed.run_at, status=out.failed.status)

    @rule(data=st.data())
    def cancel(self, data):
        job_id = self._pick_id(data, admin.CANCELLABLE)
        m = self.jobs.get(job_id)
        if m is None:
            self._unchanged(JobNotFound, lambda: admin.cancel(self.db, job_id, now=self.now))
        elif m.status not in admin.CANCELLABLE:
            self._unchanged(InvalidTransition, lambda: admin.cancel(self.db, job_id, now=self.now))
        else:
            assert admin.cancel(self.db, job_id, now=self.now) == m.status
            m.status, m.finished_at = "cancelled", self.now
            self._release(m)

    @rule(data=st.data(), every_dead=st.booleans())
    def retry(self, data, every_dead):
        if every_dead:
            dead = sorted(i for i, m in self.jobs.items() if m.status == "dead")
            assert admin.retry(self.db, now=self.now) == dead
            for job_id in dead:
                m = self.jobs[job_id]
                m.status, m.attempts, m.kills, m.run_at, m.finished_at = "queued", 0, 0, self.now, None
            return
        job_id = self._pick_id(data, admin.RETRYABLE)
        m = self.jobs.get(job_id)
        if m is None:
            self._unchanged(JobNotFound, lambda: admin.retry(self.db, job_id, now=self.now))
        elif m.status not in admin.RETRYABLE:
            self._unchanged(InvalidTransition, lambda: admin.retry(self.db, job_id, now=self.now))
        else:
            assert admin.retry(self.db, job_id, now=self.now) == [job_id]
            m.status, m.attempts, m.kills, m.run_at, m.finished_at = "queued", 0, 0, self.now, None

    # -- invariants, against the database ---------------------------------------------------------------------

    @invariant()
    def database_matches_model(self):
        def tx(c):
            return (
                c.execute("SELECT id, user_id, status, attempts, max_attempts, lease_owner, lease_token,"
                          " lease_until, run_at, finished_at, priority, started_at, last_error, errors, result,"
                          " kills FROM jobs ORDER BY id").fetchall(),
                {r[0]: r[1:] for r in c.execute("SELECT user_id, active, done_day, done_today FROM user_load")},
                {r[0]: [r[1], r[2]] for r in c.execute("SELECT day, failed, dead FROM daily_stats")},
            )

        rows, loads, daily = self.db.read(tx, "check")
        note(f"now={self.now} rows={rows} user_load={loads}")
        # None lost, none invented.
        assert [r[0] for r in rows] == sorted(self.jobs)
        active = dict.fromkeys(USERS, 0)
        done_on: dict[tuple[str, str], int] = {}
        for (job_id, user, status, attempts, max_attempts, owner, token, until, run_at, finished, prio, started,
             last_error, errors, result, kills) in rows:
            m = self.jobs[job_id]
            assert status in STATUSES
            assert status == m.status, f"job {job_id} is {status} in the database, {m.status} in the model"
            assert (user, prio, max_attempts, attempts, kills) == (
                m.user, m.priority, m.max_attempts, m.attempts, m.kills)
            # processing iff a lease is held, by exactly the holder the model knows.
            assert (status == "processing") == (token is not None) == (owner is not None) == (until is not None)
            assert (owner, token, until) == (m.owner, m.token, m.lease_until)
            # attempts <= max_attempts for non-dead jobs, and for dead ones too: a queued job always has
            # attempts < max_attempts (a failed last attempt is dead), so a claim never goes past it.
            assert attempts <= max_attempts
            if status == "scheduled":
                assert run_at == m.run_at
            if status in ("done", "dead", "cancelled"):
                assert finished == m.finished_at  # a done job is never done again
            else:
                assert finished is None
            if status == "processing":
                assert started == m.started_at
            if status == "done":
                assert _same(orjson.loads(result), m.result), "a done job's result changed or was mangled"
            else:
                assert result is None
            history = orjson.loads(errors)
            assert len(history) == min(m.failures, jobs.ERROR_HISTORY_MAX)
            assert (last_error is None) == (m.failures == 0)
            if history:
                assert history[-1]["error"] == last_error and len(last_error) <= jobs.ERROR_TEXT_MAX
            if status in ACTIVE_STATUSES:
                active[user] += 1
            if status == "done":
                day = usage.day_key(finished, self.db.tz)
                done_on[(user, day)] = done_on.get((user, day), 0) + 1
        # user_load.active is kept in code (not by triggers): it must equal the count, always.
        for user in USERS:
            got = loads[user][0] if user in loads else 0
            assert got == active[user], f"user_load.active[{user}] = {got}, but {active[user]} jobs are active"
        today = usage.day_key(self.now, self.db.tz)
        for user in USERS:
            done_day, done_today = loads[user][1:] if user in loads else ("", 0)
            if done_day == today:
                assert done_today == done_on.get((user, today), 0)
            else:
                assert done_on.get((user, today), 0) == 0, f"{user} has jobs done today but done_day={done_day}"
            if done_day:
                assert done_today == done_on.get((user, done_day), 0)
            else:
                assert done_today == 0 and not any(u == user for u, _ in done_on)
        assert daily == self.failed_by_day

    @invariant()
    def totals_match_the_rows(self):
        """The durable totals (/metrics) agree with the rows: the jobs in each state — the finished ones derived
        from totals alone — every job submitted once, every claim, failed attempt and done job counted once."""
        figures = totals.snapshot(self.db, now=self.now)
        by_state = dict.fromkeys(STATUSES, 0)
        for m in self.jobs.values():
            by_state[m.status] += 1
        assert figures.jobs_by_state == by_state
        assert sum(figures.totals["submitted"].values()) == len(self.jobs)
        assert sum(figures.totals["failed"].values()) == sum(m.failures for m in self.jobs.values())
        assert sum(figures.totals["claimed"].values()) == self.claims
        assert sum(sum(h.counts) for h in figures.durations.values()) == by_state["done"]  # (done is never left)
        queued = [i for i, m in self.jobs.items() if m.status == "queued"]
        if queued:
            created = self.db.read(lambda c: c.execute("SELECT created_at FROM jobs WHERE id = ?",
                                                       (min(queued),)).fetchall()[0][0])
            assert figures.oldest_queued_age_s == max(0.0, self.now - created)
        else:
            assert figures.oldest_queued_age_s is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(USERS[:2]), st.sampled_from([0.0, 5.0, 30.0, 3600.0, 86400.0]),
                          st.booleans()), min_size=1, max_size=12))
def test_done_today_counts_the_local_day(steps):
    """Focused on the daily counter: jobs finished around local midnight (and days apart) count on the day, in
    the database's time zone, on which they finished; done_today restarts with the day."""
    tmp = tempfile.mkdtemp(prefix="cardq-usage-")
    try:
        with Database.open(Path(tmp) / "cardq.db", create=True, timezone=TIMEZONE) as db:
            now, done_on = START, {}
            for user, seconds, fail_first in steps:
                now += seconds
                submit_mod.submit(db, [submit_mod.NewJob(b"{}")], user_id=user, plan="free",
                                  configured=UNLIMITED, now=now)
                (c,) = jobs.claim(db, "w", lease_s=60, now=now)
                if fail_first:  # a failed attempt first: it must not count
                    jobs.fail(db, c.id, c.token, "x", backoff=jobs.Backoff(0, 0), now=now)
                    (c,) = jobs.claim(db, "w", lease_s=60, now=now)
                jobs.complete(db, c.id, c.token, now=now)
                day = usage.day_key(now, db.tz)
                done_on[(c.user_id, day)] = done_on.get((c.user_id, day), 0) + 1
                loads = db.read(lambda conn: {r[0]: r[1:] for r in conn.execute(
                    "SELECT user_id, done_day, done_today, active FROM user_load")})
                for u, (done_day, done_today, active) in loads.items():
                    assert active == 0
                    assert done_today == done_on.get((u, done_day), 0)
                assert loads[user][:2] == (day, done_on[(user, day)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def _offset_changes(zone: str, years: range) -> list[float]:
    """Epoch times at which `zone`'s UTC offset changes (DST, or a zone moving across the date line)."""
    tz = zoneinfo.ZoneInfo(zone)

    def offset(t: float):
        return dt.datetime.fromtimestamp(t, tz).utcoffset()

    out = []
    for year in years:
        for month in range(1, 13):
            lo = dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()
            hi = lo + 32 * 86400
            if offset(lo) == offset(hi):
                continue
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if offset(mid) == offset(lo) else (lo, mid)
            out.append(hi)
    return sorted(set(out)) or [dt.datetime(years[0], 6, 1, tzinfo=dt.UTC).timestamp()]


# DST at midnight (Santiago, Asuncion, Havana), at 02:00 (New York), by 30 minutes (Lord Howe), a skipped day
# (Apia, 2011-12-30), none (Kolkata).
_DAY_ZONES = ("America/Santiago", "America/Asuncion", "America/Havana", "America/New_York", "Australia/Lord_Howe",
              "Pacific/Apia", "Asia/Kolkata")
_zone_and_change = st.sampled_from(_DAY_ZONES).flatmap(
    lambda zone: st.tuples(st.just(zone), st.sampled_from(_offset_changes(zone, range(2011, 2013)))))


@settings(max_examples=80, deadline=None)
@given(_zone_and_change, st.lists(st.one_of(st.floats(-2 * 86400, 2 * 86400),
                                            st.sampled_from([-3601.0, -3600.0, -1.0, -0.5, 0.0, 1.0, 3599.0])),
                                  min_size=1, max_size=40))
# Found by CI: 0.12 µs before a midnight that is also an offset change, fromtimestamp rounded into the next day.
@example(("America/Santiago", 1313899200.0), [-1.0, -1.192092896e-07])
def test_day_clock_agrees_with_day_key(zone_and_change, offsets):
    """store.usage.DayClock caches the bounds of the current local day; for times around a change of UTC offset,
    in any order, it names the same day as day_key (the direct conversion) — and the day it is in, to the last
    fraction of a second."""
    zone, change = zone_and_change
    tz = zoneinfo.ZoneInfo(zone)
    clock = usage.DayClock(tz)
    for offset in offsets:
        t = change + offset
        assert clock.key(t) == usage.day_key(t, tz), (zone, t)
        assert usage.day_key(t, tz) == dt.datetime.fromtimestamp(math.floor(t), tz).date().isoformat(), (zone, t)


TestJobStateMachine = JobMachine.TestCase
TestJobStateMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


# ---------------------------------------------------------------------------------------------------------------
# 3. Fair share
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def submission_patterns(draw, max_batches=3):
    """Batches (user, size) in submission order: 2-4 users, each 1..max_batches batches of 1..40 jobs."""
    n_users = draw(st.integers(2, 4))
    batches = [
        (f"u{u}", draw(st.integers(1, 40)))
        for u in range(n_users)
        for _ in range(draw(st.integers(1, max_batches)))
    ]
    return draw(st.permutations(batches))


def _submit_then_drain(pattern) -> tuple[dict[str, list[int]], list[tuple[str, int]]]:
    """Submit every batch (priority 0), then claim k=1 until nothing is left; returns the ids each user
    submitted (in order) and the claims as (user, id)."""
    tmp = tempfile.mkdtemp(prefix="cardq-fair-")
    try:
        with Database.open(Path(tmp) / "cardq.db", create=True) as db:
            now = START
            submitted: dict[str, list[int]] = {}
            for user, size in pattern:
                items = [submit_mod.NewJob(b"{}") for _ in range(size)]
                res = submit_mod.submit(db, items, user_id=user, plan="free", configured=UNLIMITED, now=now)
                submitted.setdefault(user, []).extend(res.ids)
                now += 0.001
            claims = []
            while got := jobs.claim(db, "w", k=1, lease_s=60, now=now):
                claims.append((got[0].user_id, got[0].id))
                now += 0.001
            return submitted, claims
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gaps(claims, submitted):
    """For each pair of consecutive claims of one user: (user, other claims between, users with jobs queued at
    the first of the two claims, including that user)."""
    left = {u: len(ids) for u, ids in submitted.items()}
    last_at: dict[str, tuple[int, int]] = {}
    out = []
    for n, (user, _) in enumerate(claims):
        if user in last_at:
            prev, queued_users = last_at[user]
            out.append((user, n - prev - 1, queued_users))
        queued_users = sum(1 for v in left.values() if v > 0)
        left[user] -= 1
        last_at[user] = (n, queued_users)
    return out


@settings(max_examples=60, deadline=None)
@given(submission_patterns())
def test_fair_share_rounds(pattern):
    """What holds when every batch is submitted before the first claim (all priority 0):

    - each user's jobs are claimed in submission order, every job exactly once;
    - claims proceed in rounds: the j-th claim of every user (j = 0, 1, ...) comes in round j, and round j holds
      exactly one claim of each user who submitted more than j jobs (every user's jobs get consecutive virtual
      times from 0, and the claim order is vt, then id);
    - hence between two consecutive claims of a user, each other user is claimed at most twice, so at most
      2 * (users with jobs queued - 1) other claims happen. The tighter bound (users with jobs queued - 1) holds
      only when each user submitted one batch (see store/fairness.py).
    """
    submitted, claims = _submit_then_drain(pattern)
    note(f"claims={[u for u, _ in claims]}")
    by_user: dict[str, list[int]] = {}
    for user, job_id in claims:
        by_user.setdefault(user, []).append(job_id)
    assert by_user == submitted  # in submission order, each exactly once, nothing left behind
    sizes = {u: len(ids) for u, ids in submitted.items()}
    seen: dict[str, int] = {}
    rounds = []
    for user, _ in claims:
        rounds.append((seen.get(user, 0), user))
        seen[user] = seen.get(user, 0) + 1
    assert [r for r, _ in rounds] == sorted(r for r, _ in rounds), "a user got ahead of its round"
    for j in range(max(sizes.values())):
        in_round = [u for r, u in rounds if r == j]
        assert sorted(in_round) == sorted(u for u, n in sizes.items() if n > j)
    for user, between, queued_users in _gaps(claims, submitted):
        assert between <= 2 * (queued_users - 1), (user, between, queued_users)


@settings(max_examples=40, deadline=None)
@given(submission_patterns(max_batches=1))
def test_fair_share_one_batch_each_is_strict_round_robin(pattern):
    """With one batch per user, the order within every round is the same (submission order of the users), so
    between two consecutive claims of a user at most (users with jobs queued - 1) other claims happen."""
    submitted, claims = _submit_then_drain(pattern)
    for user, between, queued_users in _gaps(claims, submitted):
        assert between <= queued_users - 1, (user, between, queued_users)


# Minimal example: [("u0", 1), ("u1", 2), ("u0", 1)] -> claims u0, u1, u1, u0: two claims of u1 between u0's
# two while both had jobs queued. (Hypothesis shrank to [("u0", 1), ("u0", 1), ("u1", 3), ("u0", 1)] -> u0, u1,
# u0, u1, u1, u0; the 3-batch example above is smaller and fails the same way.) Within a round (equal vt) jobs go
# by id, and u0's second batch has larger ids than u1's jobs, so the order of users inside a round can change
# from one round to the next.


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.data(), st.integers(1, 20))
def test_late_user_interleaves_one_for_one(backlog, data, late):
    """The documented promise: user A has a backlog and has already had some claimed; user B submits later and
    B's jobs alternate with A's remaining ones (A, B, A, B, ...) instead of waiting behind all of them."""
    claimed_first = data.draw(st.integers(0, backlog - 1), label="claimed before B submits")
    tmp = tempfile.mkdtemp(prefix="cardq-fair-")
    try:
        with Database.open(Path(tmp) / "cardq.db", create=True) as db:
            now = START
            submit_mod.submit(db, [submit_mod.NewJob(b"{}")] * backlog, user_id="A", plan="free",
                              configured=UNLIMITED, now=now)
            for _ in range(claimed_first):
                jobs.claim(db, "w", lease_s=60, now=now)
            submit_mod.submit(db, [submit_mod.NewJob(b"{}")] * late, user_id="B", plan="free",
                              configured=UNLIMITED, now=now)
            order = []
            while got := jobs.claim(db, "w", lease_s=60, now=now):
                order.append(got[0].user_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remaining = backlog - claimed_first
    pairs = min(remaining, late)
    assert order == ["A", "B"] * pairs + ["A"] * (remaining - pairs) + ["B"] * (late - pairs)
