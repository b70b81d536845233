"""The actors' pure parts: GCRA, path normalization, event ids, sharding, frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardq.actors import protocol
from cardq.actors.ratelimit import Policy, gcra
from cardq.actors.traffic import ID_RE, PathNormalizer, event_id, make_event
from cardq.config import PathsConfig
from cardq.errors import InputError

policies = st.builds(Policy, st.just("*"), st.integers(1, 50), st.floats(0.1, 10.0), st.integers(1, 60))


@settings(max_examples=200, deadline=None)
@given(policies, st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(1, 3)), min_size=1, max_size=300))
def test_gcra_never_allows_more_than_limit_plus_burst_in_any_window(p, steps):
    now, tat, allowed = 1000.0, None, []
    for gap, cost in steps:
        now += gap
        if cost > p.burst:
            continue
        answer, new_tat = gcra(tat, now, cost, p)
        if answer["allowed"]:
            tat = new_tat
            allowed.append((now, cost))
            assert answer["remaining"] >= 0 and answer["reset_after_s"] > 0
    for i, (t0, _) in enumerate(allowed):  # every window of window_s seconds that starts at an allowed request
        spent = sum(cost for t, cost in allowed[i:] if t < t0 + p.window_s)
        assert spent <= p.limit + p.burst + 1e-9


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(1, 200), st.integers(1, 3))
def test_gcra_retry_after_is_honest(p, hits, cost):
    """Denied with retry_after r: the same request is allowed at now + r, and not a moment before."""
    if cost > p.burst:
        return
    now, tat = 500.0, None
    for _ in range(hits):  # a burst at one instant, until denied
        answer, new_tat = gcra(tat, now, cost, p)
        if not answer["allowed"]:
            break
        tat = new_tat
    else:
        return
    r = answer["retry_after_s"]
    assert r > 0
    assert gcra(tat, now + r, cost, p)[0]["allowed"]
    assert not gcra(tat, now + r * 0.99 - 1e-6, cost, p)[0]["allowed"]


def test_gcra_defaults_are_the_old_gateways():
    p = Policy("*", 60, 60.0, 60)  # DEFAULT_RATE_LIMIT=60, DEFAULT_RATE_WINDOW=60, burst = limit
    tat, now = None, 0.0
    results = []
    for _ in range(61):
        answer, new_tat = gcra(tat, now, 1, p)
        results.append(answer["allowed"])
        tat = new_tat if answer["allowed"] else tat
    assert results.count(True) == 60 and results[-1] is False
    assert abs(answer["retry_after_s"] - 1.0) < 1e-6  # one more every second


def test_path_normalization():
    n = PathNormalizer(PathsConfig().id_rules)
    assert n("/cards/123?page=2#top") == "/cards/:id"
    assert n("/users/550e8400-e29b-41d4-a716-446655440000/cards") == "/users/:uuid/cards"
    assert n("/blobs/0123456789abcdef0123") == "/blobs/:hex"
    assert n("/cards") == "/cards" and n("/") == "/" and n("?x=1") == "/"
    assert len(n("/" + "z" * 5000)) == 1024 and n("/" + "a" * 5000) == "/:hex"


def test_event_id_is_the_old_gateways_format():
    eid = event_id(1763456789012, "10.0.0.7", "/cards/1", "req-1")
    assert ID_RE.match(eid) and eid.startswith("1763456789012-")
    assert eid == event_id(1763456789012, "10.0.0.7", "/cards/1", "req-1")  # same request, same id
    assert eid != event_id(1763456789012, "10.0.0.8", "/cards/1", "req-1")


def test_make_event_hashes_the_ip_and_refuses_bad_fields():
    def kw(**over):
        base = {"path": "/cards/7", "status": 200, "response_ms": 3.5, "client_ip": "10.1.2.3", "request_id": "r",
                "ts_ms": 1763456789012, "normalize": PathNormalizer([["^[0-9]+$", ":id"]]),
                "hash_ip": lambda ip: "h" + ip[::-1]}
        return {**base, **over}

    e = make_event(**kw())
    assert e.path == "/cards/:id" and e.client == "h3.2.1.01" and "10.1.2.3" not in str(e)
    for bad, message in ((dict(path="cards"), "path 'cards'"), (dict(status=700), "status 700"),
                         (dict(response_ms=-1), "response_ms -1"), (dict(ts_ms=123), "ts_ms 123"),
                         (dict(idempotent_id="nope"), "idempotent_id 'nope'")):
        with pytest.raises(InputError, match=message):
            make_event(**kw(**bad))


def test_shards_are_stable_and_spread():
    assert protocol.shard_of("user:42", 4) == protocol.shard_of("user:42", 4)
    assert protocol.shard_of("anything", 1) == 0
    counts = [0] * 4
    for i in range(4000):
        counts[protocol.shard_of(f"k{i}", 4)] += 1
    assert min(counts) > 800


def test_frames_are_json_objects_only():
    assert protocol.decode(protocol.encode({"op": "x"})) == {"op": "x"}
    for garbage in (b"\\x80\\x04pickle", b"[1,2]", b"", b"{"):
        with pytest.raises(protocol.BadFrame):
            protocol.decode(garbage)
    fp = protocol.fingerprint("counter", "incr", {"key": "a", "n": 1})
    assert len(fp) == 12 and int(fp, 16) < 2**48
