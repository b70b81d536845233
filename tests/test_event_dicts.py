"""make_event_dicts (the recorder's way of validating a whole array of events at once) gives exactly what
make_event gives one event at a time, and None — so that make_event names the culprit — for anything else."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from cardq.actors.traffic import PathNormalizer, make_event, make_event_dicts
from cardq.config import load_config

NORMALIZE = PathNormalizer(load_config(None).config.paths.id_rules)


def hash_ip(ip: str) -> str:
    return f"h{len(ip)}"


TS = st.integers(10**12 - 5, 10**13 + 5)
EVENT = st.fixed_dictionaries(
    {"path": st.sampled_from(["/cards/17?x=1", "/a/b#f", "/", "/u/0123456789abcdef0123", "x", ""]),
     "status": st.one_of(st.integers(90, 610), st.just("200"), st.just(True)),
     "response_ms": st.one_of(st.floats(allow_nan=True), st.integers(-1, 10**10))},
    optional={"method": st.sampled_from(["get", "POST", "x" * 20, "x" * 300, 5]),
              "client_ip": st.sampled_from(["", "10.0.0.1", "::1", "y" * 300]),
              "request_id": st.text(max_size=5),
              "ts_ms": st.one_of(st.none(), TS, st.just(1.5)),
              "bytes": st.one_of(st.none(), st.integers(-1, 2**63)),
              "idempotent_id": st.one_of(st.none(), st.just("1795000000000-0a1b2c3d"), st.just("nope")),
              "extra": st.just(1)})


def one_by_one(events: list[dict]) -> list[dict] | None:
    try:
        return [msgspec.structs.asdict(make_event(normalize=NORMALIZE, hash_ip=hash_ip, **e)) for e in events]
    except Exception:
        return None


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=6))
def test_the_same_events_as_one_by_one_or_none(events):
    expected = one_by_one(events)
    got = make_event_dicts(events, normalize=NORMALIZE, hash_ip=hash_ip)
    if expected is None:
        assert got is None
        return
    if got is None:  # (allowed only where make_event takes something of another type, e.g. a str subclass)
        raise AssertionError(f"valid events refused: {events}")
    for e, g, event in zip(expected, got, events, strict=True):
        if event.get("ts_ms") is None:  # "now", read at two different moments (and the id made of it)
            for field in ("ts_ms", "id"):
                e[field] = g[field] = None
        assert g == e and list(g) == list(e)
        assert [type(v) for v in g.values()] == [type(v) for v in e.values()]
