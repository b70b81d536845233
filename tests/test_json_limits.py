"""Deep and wide JSON in payloads and results: a value cardq accepts can always be stored, read back and shown;
one it cannot store is refused where it enters (an InputError at submit; a failed attempt for a result) —
never an error further down, never a crashed worker."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cardq
from cardq import inputs, jsonshape
from cardq.app import parse_duration
from cardq.store import Database, jobs, queries
from cardq.store.submit import submit

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False)
wide = st.recursive(scalars, lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=4), kids,
                                                                                        max_size=6), max_leaves=60)


@st.composite
def nested(draw) -> object:
    """A wide value wrapped `depth` levels deep in objects and arrays, around the limit and far past it."""
    depth = draw(st.one_of(st.integers(0, 80), st.integers(240, 300), st.sampled_from([63, 64, 65, 253, 254, 255])))
    value = draw(wide)
    for i in range(depth):
        value = {"k": value} if draw(st.booleans()) or i == depth - 1 else [value]
    return value


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=nested())
def test_a_payload_is_stored_and_shown_whole_or_refused_at_submit(tmp_path_factory, item):
    db = Database.open(tmp_path_factory.mktemp("deep") / "cardq.db", create=True)
    try:
        payload = {"item": item}
        try:
            [parsed] = inputs.items_from_objects([payload])
        except cardq.InputError as e:
            assert depth_of(payload) > jsonshape.MAX_DEPTH and e.index == 0 and "deeper than 64" in e.reason
            return
        assert depth_of(payload) <= jsonshape.MAX_DEPTH
        configured = {k: (10**9, "config") for k in ("batch_max_items_per_request", "batch_max_queued_per_user",
                                                      "job_processing_timeout_seconds", "max_payload_bytes",
                                                      "daily.free")}
        [job_id] = submit(db, [parsed], user_id="u", plan="free", configured=configured).ids
        job = queries.get(db, job_id)
        assert job["payload"] == orjson.loads(orjson.dumps(payload))
        orjson.dumps({"job": job, "wrapped": [[job]]})  # what `jobs show` and an HTTP answer add around it
    finally:
        db.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(result=nested())
def test_a_result_is_stored_whole_or_its_attempt_fails_cleanly(tmp_path_factory, result):
    db = Database.open(tmp_path_factory.mktemp("deep") / "cardq.db", create=True)
    try:
        configured = {k: (10**9, "config") for k in ("batch_max_items_per_request", "batch_max_queued_per_user",
                                                      "job_processing_timeout_seconds", "max_payload_bytes",
                                                      "daily.free")}
        submit(db, [inputs.Item(b"{}")], user_id="u", plan="free", configured=configured)
        [held] = jobs.claim(db, "w", lease_s=60)
        try:
            jsonshape.encode(result)  # the worker's check, before the result joins a batch
        except ValueError as e:
            assert depth_of(result) > jsonshape.MAX_DEPTH and "deeper than 64" in str(e)
            return
        assert jobs.complete_many(db, [(held.id, held.token, result)]) == []  # the batch encoding cannot fail
        stored = queries.get(db, held.id)
        assert stored["status"] == "done" and stored["result"] == orjson.loads(orjson.dumps(result))
        orjson.dumps({"job": stored})
    finally:
        db.close()


@pytest.mark.parametrize("text", ["1000000000000000000000d", "1e9d", "99999999999w", "-1d"])
def test_absurd_durations_are_input_errors(text):
    with pytest.raises(cardq.InputError, match="duration"):
        parse_duration(text)
