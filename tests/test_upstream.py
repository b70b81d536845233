"""The card generator against an OpenAI-compatible API: a real HTTP server on 127.0.0.1 (tests/fake_upstream.py)
scripted to answer well, slowly, with 429 + Retry-After, 5xx, 401, malformed or schema-violating output."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import orjson
import pytest
from fake_upstream import GOOD_CARD, FakeUpstream, completion

from cardq.config import load_config
from cardq.generate import UpstreamError, generate
from cardq.handlers import Job, PermanentError, RetryAfter

from conftest import wait_for
from supervision import Deployment

ITEM = {"title": "Wireless earbuds", "description": "Bluetooth 5.3, 30 h battery", "category": "electronics",
        "marketplace": "ozon", "style": "selling"}


@pytest.fixture
def upstream():
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
def job_for(tmp_path: Path, upstream: FakeUpstream, monkeypatch):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-test-123")

    def make(item: dict | None = None, **upstream_cfg) -> Job:
        cfg = {"base_url": upstream.base_url, "model": "fake-model", "api_key_env": "TEST_UPSTREAM_KEY",
               "request_timeout_ms": 2000, **upstream_cfg}
        path = tmp_path / "config.toml"
        path.write_text("[upstream]\n" + "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in cfg.items()))
        return Job(1, "u1", "basic", "card", item or ITEM, 1, 5, load_config(path).config, tmp_path)

    return make


def test_a_good_answer_is_the_card_with_its_usage(upstream, job_for):
    result = generate(job_for())
    assert {k: result[k] for k in GOOD_CARD} == GOOD_CARD
    assert result["_meta"]["usage"]["total_tokens"] == 49 and result["_meta"]["model"] == "fake-model"
    [req] = upstream.requests
    assert req["path"] == "/v1/chat/completions" and req["authorization"] == "Bearer sk-test-123"
    body = req["body"]
    assert body["model"] == "fake-model" and body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["title", "bullets", "seo_keywords",
                                                                           "description"]
    assert "ozon" in body["messages"][1]["content"] and "Wireless earbuds" in body["messages"][1]["content"]


def test_429_and_503_with_retry_after_schedule_the_retry_no_earlier(upstream, job_for):
    upstream.then(429, {"error": {"message": "Rate limit reached"}}, {"retry-after": "7"})
    with pytest.raises(RetryAfter) as e:
        generate(job_for())
    assert e.value.seconds == 7 and "Rate limit reached" in str(e.value)
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    upstream.then(503, {"error": "overloaded"}, {"retry-after": when})
    with pytest.raises(RetryAfter) as e:
        generate(job_for())
    assert 55 <= e.value.seconds <= 61


@pytest.mark.parametrize("status, headers", [(500, {}), (502, {}), (429, {}), (503, {})])
def test_5xx_and_overload_without_retry_after_are_ordinary_failures(upstream, job_for, status, headers):
    upstream.then(status, {"error": {"message": "boom"}}, headers)
    with pytest.raises(UpstreamError, match=f"upstream {status}: boom"):
        generate(job_for())


@pytest.mark.parametrize("status", [400, 401, 403])
def test_4xx_are_permanent_with_the_upstreams_message(upstream, job_for, status):
    upstream.then(status, {"error": {"message": "Incorrect API key provided"}})
    with pytest.raises(PermanentError, match=f"upstream {status}: Incorrect API key provided"):
        generate(job_for())


def test_a_request_past_its_timeout_is_an_ordinary_failure(upstream, job_for):
    upstream.then(200, completion(orjson.dumps(GOOD_CARD).decode()), delay_s=1.5)
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="request_timeout_ms=300"):
        generate(job_for(request_timeout_ms=300))
    assert time.monotonic() - started < 1.4  # it did not wait for the answer


def test_output_that_is_not_the_card_is_asked_again_once_then_permanent_with_the_raw_text(upstream, job_for):
    upstream.then(200, completion("Sure! Here is your card: {oops"))
    result = generate(job_for())  # the second answer (the default: a good card) is taken
    assert result["title"] == GOOD_CARD["title"] and len(upstream.requests) == 2
    assert result["_meta"]["usage"]["total_tokens"] == 2 * 49  # both asks' tokens were spent
    upstream.then(200, completion("not json at all"))
    upstream.then(200, completion(orjson.dumps({"title": "x", "bullets": "not a list"}).decode()))
    with pytest.raises(PermanentError, match="failed the card schema twice") as e:
        generate(job_for())
    assert "not a list" in str(e.value)  # the raw text is kept


def test_a_body_that_is_not_json_or_has_no_choices_is_an_ordinary_failure(upstream, job_for):
    upstream.then(200, b"<html>gateway</html>")
    with pytest.raises(UpstreamError, match="not JSON"):
        generate(job_for())
    upstream.then(200, {"choices": []})
    with pytest.raises(UpstreamError, match="no choices"):
        generate(job_for())


def test_prompts_come_from_files_next_to_the_config(upstream, job_for, tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "ozon.premium.txt").write_text("PREMIUM OZON {title} / {nope}")
    (tmp_path / "prompts" / "default.txt").write_text("DEFAULT {title}")
    generate(job_for({**ITEM, "style": "premium"}, prompts_dir="prompts"))
    generate(job_for({**ITEM, "marketplace": "avito"}, prompts_dir="prompts"))
    prompts = [r["body"]["messages"][1]["content"] for r in upstream.requests]
    assert prompts == ["PREMIUM OZON Wireless earbuds / -", "DEFAULT Wireless earbuds"]


def test_no_base_url_or_no_text_is_permanent(job_for):
    with pytest.raises(PermanentError, match="upstream.base_url is not set"):
        generate(job_for(base_url="", model=""))
    with pytest.raises(PermanentError, match="neither"):
        generate(job_for({"category": "x"}))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_through_the_queue_retry_after_is_honoured_and_cards_are_stored(upstream, tmp_path):
    d = Deployment(tmp_path, workers={"count": 1, "handler": "cardq.cards:generate", "gate": "",
                                      "backoff_base_s": 0.0, "backoff_max_s": 0.0},
                   upstream={"base_url": upstream.base_url, "model": "fake-model"})
    try:
        upstream.then(429, {"error": {"message": "slow down"}}, {"retry-after": "30"})
        [throttled] = d.submit([ITEM])
        d.start()
        job = wait_for(lambda: (j := d.job(throttled))["status"] == "scheduled" and j, 60, what="scheduled")
        assert job["run_at"] - job["updated_at"] >= 29.9  # not before the upstream said (backoff here is 0)
        assert job["last_error"] == "retry after 30s: upstream 429: slow down"
        [ok] = d.submit([ITEM])
        done = wait_for(lambda: (j := d.job(ok))["status"] == "done" and j, 60, what="the next card made")
        assert done["result"]["title"] == GOOD_CARD["title"] and done["result"]["_meta"]["usage"]["prompt_tokens"]
        day = d.db.days.key(done["finished_at"])  # the user's tokens that day, in a counter apps can read
        assert d.cardq("counter", "get", f"tokens:u1:{day}", check=True).stdout.strip() == "49"
    finally:
        d.close()
