"""The HTTP API against a real supervisor tree: its HTTP child on a free port, real tokens, a real HTTP client
(httpx), raw sockets for the clients that misbehave (slow headers, too many connections)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest

import cardq
from cardq.config import load_config
from cardq.errors import ConfigError
from cardq.running import http_address

from conftest import wait_for
from supervision import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HTTP = {"enabled": True, "listen": "127.0.0.1:0", "header_timeout_s": 2.0, "max_connections": 6,
        "max_body_bytes": 4096, "max_events_per_request": 10, "gate_lease_s": 30.0, "body_timeout_s": 2.0,
        "max_waits": 3}


def start(tmp: Path, **overrides) -> tuple[Deployment, str]:
    d = Deployment(tmp, http={**HTTP, **overrides.pop("http", {})}, **overrides)
    d.start()
    url = wait_for(lambda: http_address(d.loaded.run_dir), 60, what="the HTTP server listening")
    wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 60, 0.05, "ready")
    return d, url


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d, url = start(tmp_path_factory.mktemp("http"),
                   ratelimit={"policies": {"t:*": {"limit": 3, "window_s": 60}}},
                   gates={"g2": {"max_concurrency": 2, "max_queue": 1, "queue_timeout_ms": 500}})
    with cardq.connect(d.config_path, name="test") as q:
        tokens = {s: q.create_token(s, f"test-{s}").token for s in ("read", "app", "admin")}
    try:
        yield d, url, tokens
    finally:
        d.close()


def client(site, scope: str | None = "admin") -> httpx.Client:
    _, url, tokens = site
    headers = {"Authorization": f"Bearer {tokens[scope]}"} if scope else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"] and body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    return body


# ---- health, auth, request ids ----------------------------------------------------------------------------------

def test_health_needs_no_token_and_everything_else_does(site):
    with client(site, None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and set(ready["checks"]) == {"database", "actors", "children"}
        r = c.get("/v1/status")
        assert problem(r, 401)["type"].endswith("/unauthorized") and r.headers["www-authenticate"].startswith("Bearer")
        r = c.get("/v1/status", headers={"Authorization": "Bearer cq_nope"})
        assert 'error="invalid_token"' in r.headers["www-authenticate"] and problem(r, 401)
    with client(site, "read") as c:
        assert c.get("/v1/status").status_code == 200
        body = problem(c.post("/v1/jobs", json={"user": "u", "plan": "basic", "items": [{"title": "x"}]}), 403)
        assert "'read'" in body["detail"] and "'app'" in body["detail"]
    with client(site, "app") as c:
        assert problem(c.put("/v1/limits/daily.free", json={"value": 9}), 403)
        assert c.get("/v1/limits").status_code == 200  # read is below app


def test_request_id_is_echoed_or_made(site):
    with client(site) as c:
        assert c.get("/v1/limits", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
        made = c.get("/v1/limits", headers={"X-Request-Id": "bad id\twith junk"}).headers["x-request-id"]
        assert made != "bad id\twith junk" and len(made) == 16
        assert problem(c.get("/v1/nope"), 404)["type"].endswith("/not-found")
        assert problem(c.delete("/v1/status"), 405)


def test_a_revoked_token_stops_working(site):
    d, url, _ = site
    with cardq.connect(d.config_path, name="test") as q:
        t = q.create_token("read", "short-lived")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {t.token}"}) as c:
            assert c.get("/v1/limits").status_code == 200
            assert q.revoke_token(t.id)
            wait_for(lambda: c.get("/v1/limits").status_code == 401, 30, 0.05, "the revoked token refused")


# ---- jobs ----------------------------------------------------------------------------------------------------------

def test_submit_wait_list_and_get_jobs(site):
    with client(site, "app") as c:
        r = c.post("/v1/jobs", json={"user": "h1", "plan": "enterprise", "kind": "card", "priority": 3,
                                     "items": [{"title": "Mug", "sku": "M1"}, {"title": "Mat", "sku": "M2"}],
                                     "idempotency_key_field": "sku"})
        assert r.status_code == 202, r.text
        first = r.json()
        assert first["created"] == 2 and first["existing"] == 0 and len(first["ids"]) == 2
        again = c.post("/v1/jobs", json={"user": "h1", "plan": "enterprise", "items": [{"title": "Mug", "sku": "M1"}],
                                         "idempotency_key_field": "sku"}).json()
        assert again == {"ids": first["ids"][:1], "created": 0, "existing": 1}
        for job_id in first["ids"]:
            w = c.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 60}).json()
            assert w["finished"] and w["job"]["status"] == "done" and w["job"]["result"] is not None
        job = c.get(f"/v1/jobs/{first['ids'][0]}").json()
        assert job["payload"] == {"title": "Mug", "sku": "M1"} and job["priority"] == 3
        page = c.get("/v1/jobs", params={"user": "h1", "limit": 1}).json()
        assert [j["id"] for j in page["jobs"]] == [first["ids"][1]] and page["cursor"] == first["ids"][1]
        rest = c.get("/v1/jobs", params={"user": "h1", "limit": 1, "cursor": page["cursor"]}).json()
        assert [j["id"] for j in rest["jobs"]] == [first["ids"][0]]
        assert problem(c.get("/v1/jobs/999999"), 404)["job_id"] == 999999
        assert problem(c.get("/v1/jobs", params={"status": "lost"}), 400)["where"] == "status"


def test_wait_answers_at_its_timeout_with_the_state_then(site, tmp_path):
    d, _, _ = site
    with client(site, "app") as c:
        gate = tmp_path / "go"
        job_id = c.post("/v1/jobs", json={"user": "h2", "plan": "enterprise",
                                          "items": [{"wait_file": str(gate)}]}).json()["ids"][0]
        w = c.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 0.3}).json()
        assert not w["finished"] and w["job"]["status"] in ("queued", "processing")
        gate.touch()
        assert c.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 60}).json()["job"]["status"] == "done"


def test_a_limit_is_a_429_with_its_figures_and_retry_after(site):
    with client(site, "app") as c:
        body = problem(c.post("/v1/jobs", json={"user": "h3", "plan": "free",
                                                "items": [{"title": f"S{i}"} for i in range(6)]}), 429)
        assert (body["limit"], body["allowed"], body["current"], body["requested"]) == ("daily.free", 5, 0, 6)
        r = c.post("/v1/jobs", json={"user": "h3", "plan": "free", "items": [{"title": f"S{i}"} for i in range(6)]})
        # Retry-After: the next day boundary (in the limits' time zone), in whole seconds.
        assert 0 < int(r.headers["retry-after"]) <= 86400
        assert abs(body["resets_at"] - time.time() - int(r.headers["retry-after"])) < 5


def test_operator_actions_need_admin_and_work(site, tmp_path):
    with client(site, "admin") as c:
        gate = tmp_path / "never"
        ids = c.post("/v1/jobs", json={"user": "h4", "plan": "enterprise",
                                       "items": [{"wait_file": str(gate), "n": n} for n in range(2)]}).json()["ids"]
        cancel = c.post(f"/v1/jobs/{ids[1]}/cancel").json()
        assert cancel["status"] == "cancelled" and cancel["was"] in ("queued", "processing")
        assert problem(c.post(f"/v1/jobs/{ids[1]}/cancel"), 409)
        assert c.post(f"/v1/jobs/{ids[1]}/retry").json()["ids"] == [ids[1]]
        gate.touch()
        assert c.post("/v1/jobs/purge", json={"older_than": "0s", "dry_run": True}).json()["would_purge"] >= 0
        r = c.put("/v1/limits/daily.free", json={"value": 7})
        assert r.json() == {"key": "daily.free", "value": 7, "source": "override"}
        assert c.get("/v1/limits").json()["daily.free"]["value"] == 7
        assert c.delete("/v1/limits/daily.free").json()["source"] in ("config", "default")
        assert "expected" in problem(c.put("/v1/limits/daily.nope", json={"value": 1}), 400)["detail"]


# ---- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "where", "words"), [
    (b'{"user": "u", "plan": ', "body", "truncated"),
    (b'{"user": 5, "plan": "basic", "items": []}', "user", "expected `str`, got `int`"),
    (b'{"user": "u", "plan": "basic", "items": [], "colour": "red"}', "colour", "unknown field"),
    (b'{"user": "u", "plan": "basic"}', "body", "missing required field `items`"),
    (b'{"user": "u", "plan": "basic", "items": [{"title": "a"}, 7]}', "items[1]", "expected `object`"),
    (b'[1, 2]', "body", "expected `object`, got `array`"),
])
def test_bad_bodies_name_the_field(site, body, where, words):
    with client(site, "app") as c:
        p = problem(c.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), 400)
        assert p["where"] == where and words in p["detail"], p


def test_bodies_over_the_cap_are_413_declared_or_streamed(site):
    big = orjson.dumps({"user": "u", "plan": "basic", "items": [{"title": "x" * 5000}]})
    with client(site, "app") as c:
        assert problem(c.post("/v1/jobs", content=big, headers={"content-type": "application/json"}), 413)

        def chunks():  # no Content-Length: chunked, counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        assert problem(c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)
        events = [{"path": "/x", "status": 200, "response_ms": 1}] * 11
        assert problem(c.post("/v1/events", json=events), 413)["max_events"] == 10


# ---- rate limits, gates, counters ----------------------------------------------------------------------------------

def test_rate_limit_checks_carry_the_ietf_fields(site):
    with client(site, "app") as c:
        seen = [c.post("/v1/ratelimit/check", json={"key": "t:client-1"}) for _ in range(4)]
        assert [r.status_code for r in seen] == [200, 200, 200, 429]
        assert [r.headers["ratelimit"].split(";")[1] for r in seen] == ["r=2", "r=1", "r=0", "r=0"]
        assert all(r.headers["ratelimit-policy"] == '"t:*";q=3;w=60' for r in seen)
        denied = seen[3]
        assert denied.json()["allowed"] is False and 1 <= int(denied.headers["retry-after"]) <= 20
        other = c.post("/v1/ratelimit/check", json={"key": "someone-else", "cost": 2})
        assert other.status_code == 200 and other.headers["ratelimit-policy"].startswith('"default";q=60;')
        assert problem(c.post("/v1/ratelimit/check", json={"key": ""}), 400)["where"] == "key"


def test_gate_permits_are_leases(site):
    with client(site, "app") as c:
        a = c.post("/v1/gates/g2/acquire", json={"wait_ms": 2000}).json()
        b = c.post("/v1/gates/g2/acquire", json={"wait_ms": 2000, "lease_s": 1.0}).json()
        assert a["permit"] != b["permit"] and a["lease_s"] == 30.0 and b["lease_s"] == 1.0
        full = c.post("/v1/gates/g2/acquire", json={"wait_ms": 100})
        assert problem(full, 503)["type"].endswith("/overloaded") and full.headers["retry-after"] == "1"
        # b is never renewed: its permit comes back by itself (after 1 s), and a next caller gets it. (Each try
        # waits at most the gate's queue_timeout_ms, 500 ms, whatever wait_ms asks.)

        def acquired():
            r = c.post("/v1/gates/g2/acquire", json={"wait_ms": 20000})
            return r if r.status_code == 200 else None

        third = wait_for(acquired, 60, 0.05, "b's lease expired and its permit given to another caller")
        assert problem(c.post("/v1/gates/g2/renew", json={"permit": b["permit"]}), 400)["where"] == "permit"
        assert c.post("/v1/gates/g2/renew", json={"permit": a["permit"], "lease_s": 60}).json()["lease_s"] == 60
        for p in (a, third.json()):
            assert c.post("/v1/gates/g2/release", json={"permit": p["permit"]}).json() == {"released": True}
        assert problem(c.post("/v1/gates/g2/release", json={"permit": a["permit"]}), 400)
        assert problem(c.post("/v1/gates/nope/acquire", json={"wait_ms": 100}), 400)
        stats = c.get("/v1/diag/gates").json()
        assert stats["g2"]["active"] == 0


def test_counters_apply_each_op_id_once(site):
    with client(site, "app") as c:
        assert c.post("/v1/counters/cards:made/incr", json={"n": 5, "op_id": "op-1"}).json()["value"] == 5
        assert c.post("/v1/counters/cards:made/incr", json={"n": 5, "op_id": "op-1"}).json()["value"] == 5
        assert c.post("/v1/counters/cards:made/incr", json={"n": 2}).json()["value"] == 7
        assert c.get("/v1/counters/cards:made").json() == {"key": "cards:made", "value": 7}


# ---- traffic -------------------------------------------------------------------------------------------------------

def test_events_are_idempotent_and_reach_the_path_stats(site):
    now_ms = int(time.time() * 1000)
    events = [{"path": f"/cards/{i}", "status": 200 if i % 3 else 503, "response_ms": 10.0 + i, "client_ip": "10.0.0.1",
               "request_id": f"r{i}", "ts_ms": now_ms, "bytes": 100} for i in range(6)]
    with client(site, "app") as c:
        r = c.post("/v1/events", json=events)
        assert r.status_code == 202 and r.json()["accepted"] == 6 and len(set(r.json()["ids"])) == 6
        again = c.post("/v1/events", json=events).json()  # a client's retry of the same payload
        assert (again["accepted"], again["duplicates"], again["ids"]) == (0, 6, r.json()["ids"])
        one = c.post("/v1/events", json={"path": "/cards/9", "status": 404, "response_ms": 2.5}).json()
        assert one["accepted"] == 1
        bad = problem(c.post("/v1/events", json=[events[0], {"path": "nope", "status": 200, "response_ms": 1}]), 400)
        assert bad["where"].startswith("events[1]")
    with client(site, "read") as c:
        top = c.get("/v1/paths/top").json()["paths"]
        row = next(p for p in top if p["path"] == "/cards/:id")
        assert row["requests"] == 7 and row["status_5xx"] == 2 and row["status_4xx"] == 1
        assert row["unique_clients"] >= 1 and row["p95_ms"] >= row["p50_ms"] > 0
        stats = c.get("/v1/paths/stats", params={"path": "/cards/:id", "hours": 2}).json()
        assert sum(h["requests"] for h in stats["hours"]) == 7
        assert problem(c.get("/v1/paths/stats"), 400)["where"] == "path"
        assert problem(c.get("/v1/paths/top", params={"hour": "yesterday"}), 400)["where"] == "hour"


# ---- documents ---------------------------------------------------------------------------------------------------

def test_openapi_document_is_valid_and_lists_every_route(site):
    from openapi_spec_validator import validate

    from cardq.web.routes import ROUTES

    with client(site, None) as c:
        doc = c.get("/openapi.json").json()
    validate(doc)
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        assert op["summary"] and (("security" in op) == (r.scope is not None))
    assert doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/SubmitJobs"
    assert "items" in doc["components"]["schemas"]["SubmitJobs"]["required"]


def test_status_selftest_and_diag_for_a_read_token(site):
    with client(site, "read") as c:
        status = c.get("/v1/status").json()
        assert status["supervisor"]["running"] and any(w["name"] == "http-0" for w in status["supervisor"]["workers"])
        assert c.get("/v1/selftest").json()["checks"]
        assert "generation" in c.get("/v1/diag/gates").json()


# ---- clients that misbehave ----------------------------------------------------------------------------------------

def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_a_client_trickling_headers_is_dropped_while_others_are_served(site):
    _, url, _ = site
    slow = _connect(url)
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    closed = False
    with client(site, None) as c:
        for ch in b"Host: x\r\nX-Slow: " + b"a" * 200:  # one byte at a time, far slower than the 2 s deadline
            try:
                slow.sendall(bytes([ch]))
                slow.settimeout(0.2)
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
            assert c.get("/healthz").status_code == 200  # served meanwhile
            if time.monotonic() - started > 60:
                break
    slow.close()
    assert closed, "the slow client was never dropped"


def test_past_max_connections_new_requests_get_503_and_the_open_ones_are_served(site):
    _, url, tokens = site
    held = [httpx.Client(base_url=url, timeout=30) for _ in range(HTTP["max_connections"])]
    try:
        for h in held:  # each keeps its connection open (keep-alive); an earlier test's closing connection may
            # still count for a moment, so each of ours tries until it is in
            wait_for(lambda h=h: h.get("/healthz").status_code == 200, 30, 0.05, "a connection under the cap")
        with httpx.Client(base_url=url, timeout=30) as extra:
            r = extra.get("/healthz")
            assert r.status_code == 503
        for h in held:
            assert h.get("/healthz").status_code == 200
    finally:
        for h in held:
            h.close()


def test_headers_past_64_kib_are_refused_431_and_closed(site):
    _, url, _ = site
    s = _connect(url)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        with contextlib.suppress(OSError):  # (the server may close while we still send)
            for _ in range(100):  # 100 x 8 KiB of header lines, as fast as they go
                s.sendall(b"X-Pad: " + b"a" * 8192 + b"\r\n")
        s.settimeout(30)
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 ")
    finally:
        s.close()
    with client(site, None) as c:
        assert c.get("/healthz").status_code == 200


def test_a_body_that_never_comes_is_answered_408_and_closed(site):
    _, url, tokens = site
    s = _connect(url)
    try:
        s.sendall(b"POST /v1/ratelimit/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + tokens["app"].encode() + b"\r\nContent-Length: 100\r\n\r\n{")
        s.settimeout(60)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b"body_timeout_s" in answer
    finally:
        s.close()


def test_long_polls_whose_clients_left_free_their_places(site, tmp_path):
    _, url, tokens = site
    with client(site, "app") as c:
        job_id = c.post("/v1/jobs", json={"user": "h5", "plan": "enterprise",
                                          "items": [{"wait_file": str(tmp_path / "never")}]}).json()["ids"][0]
        request = (f"GET /v1/jobs/{job_id}/wait?timeout=300 HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {tokens['read']}\r\n\r\n").encode()
        for _ in range(3 * HTTP["max_waits"]):  # each sends its poll and goes away at once
            s = _connect(url)
            s.sendall(request)
            s.close()
        # max_waits is 3: a poll that stays is taken again (those whose clients left stopped) and answers at its
        # own timeout; the server meanwhile serves everyone else.
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 0.1}).status_code == 200, 60, 0.1,
                 "a long poll taken again once the abandoned ones stopped")
        assert c.get("/healthz").status_code == 200
        (tmp_path / "never").touch()


def test_bodies_nested_too_deeply_and_numbers_too_large_are_400(site):
    with client(site, "app") as c:
        deep = b"[" * 2000 + b"]" * 2000  # (under max_body_bytes: the depth, not the size, is refused)
        assert problem(c.post("/v1/events", content=deep, headers={"content-type": "application/json"}), 400)
        assert problem(c.get("/v1/paths/top", params={"hour": "9" * 5000}), 400)["where"] == "hour"
        assert c.post("/v1/counters/big/incr", json={"n": 2**53, "op_id": "b0"}).status_code == 200
        for i in range(1, 1100):
            r = c.post("/v1/counters/big/incr", json={"n": 2**53, "op_id": f"b{i}"})
            if r.status_code != 200:
                break
        assert "64-bit" in problem(r, 400)["detail"]


def test_no_traceback_in_the_log(site):
    d, _, _ = site
    lines = d.log_lines()
    http = [x for x in lines if x.get("role") == "http"]
    assert any(x["event"] == "http.refused" and x.get("request_id") for x in http)
    assert not [x for x in lines if "Traceback" in orjson.dumps(x).decode()]


# ---- config and the process ----------------------------------------------------------------------------------------

def test_listening_beyond_loopback_needs_tls_or_a_stated_proxy(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[http]\nlisten = "0.0.0.0:8787"\n')
    with pytest.raises(ConfigError, match=r"http.listen = \"0.0.0.0:8787\": beyond loopback.*tls_cert"):
        load_config(path)
    path.write_text('[http]\nlisten = "0.0.0.0:8787"\nallow_plain_remote = true\n')
    assert load_config(path).config.http.allow_plain_remote
    path.write_text('[http]\nlisten = "localhost"\n')
    with pytest.raises(ConfigError, match="expected \"host:port\""):
        load_config(path)


def test_a_taken_port_is_retried_while_the_job_system_runs(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    d = Deployment(tmp_path, http={**HTTP, "listen": f"127.0.0.1:{port}"})
    try:
        d.start()
        wait_for(lambda: any(x["event"] == "http.bind_failed" for x in d.log_lines()), 60, what="bind_failed")
        ids = d.submit([{"title": "still works"}])
        wait_for(lambda: d.statuses(ids) == {"done": 1}, 60, what="the job done without the HTTP server")
        blocker.close()
        url = wait_for(lambda: http_address(d.loaded.run_dir), 90, 0.1, "the HTTP server bound at last")
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        blocker.close()
        d.close()


def test_a_reload_that_changes_http_restarts_the_server_on_the_new_address(tmp_path):
    d, url = start(tmp_path)
    try:
        sock = tmp_path / "cardq-http.sock"
        d.write_config(http={"listen": str(sock)})
        os.kill(d.procs[0].pid, signal.SIGHUP)
        wait_for(lambda: http_address(d.loaded.run_dir) == f"unix:{sock}", 60, 0.05, "the server on the socket")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://cardq") as c:
            assert c.get("/healthz").json() == {"status": "ok"}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        d.close()


def test_readyz_names_an_actor_that_does_not_answer(tmp_path):
    d, url = start(tmp_path)
    try:
        rows = d.db.conn.execute("SELECT name, pid FROM processes WHERE name = 'counter-0'").fetchall()
        pid = rows[0][1]
        os.kill(pid, signal.SIGSTOP)  # wedged: alive, but answering nothing
        try:
            r = httpx.get(f"{url}/readyz", timeout=30)
            body = problem(r, 503)
            assert body["detail"].startswith("actors:") and body["checks"]["database"] == "ok"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=30).status_code == 200, 60, 0.1, "ready again")
    finally:
        d.close()


def test_token_cli(tmp_path):
    d = Deployment(tmp_path)
    try:
        made = d.cardq("token", "create", "--scope", "read", "--name", "grafana", check=True)
        token = made.stdout.strip()
        assert token.startswith("cq_") and "shown once" in made.stderr
        listed = d.cardq("token", "list", "--json", check=True)
        rows = orjson.loads(listed.stdout)
        assert [(r["name"], r["scope"], r["revoked_at"]) for r in rows] == [("grafana", "read", None)]
        assert token not in listed.stdout and token not in (tmp_path / "cardq.db").read_bytes().decode("latin-1")
        assert d.cardq("token", "revoke", str(rows[0]["id"]), check=True).returncode == 0
        again = d.cardq("token", "revoke", str(rows[0]["id"]))
        assert again.returncode == 2 and "no live token" in again.stderr
        assert d.cardq("token", "create", "--scope", "root").returncode == 2
    finally:
        d.close()


def test_tls_files_that_cannot_be_read_are_retried_then_served_over_https(tmp_path):
    import trustme

    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    d = Deployment(tmp_path, http={**HTTP, "tls_cert": str(cert), "tls_key": str(key)})
    try:
        d.start()
        wait_for(lambda: any(x["event"] == "http.tls_failed" for x in d.log_lines()), 60, what="tls_failed logged")
        ids = d.submit([{"title": "runs without the HTTP server"}])
        wait_for(lambda: d.statuses(ids) == {"done": 1}, 60, what="the job done meanwhile")
        ca = trustme.CA()
        server_cert = ca.issue_cert("127.0.0.1")
        cert.parent.mkdir()
        server_cert.cert_chain_pems[0].write_to_path(str(cert))
        server_cert.private_key_pem.write_to_path(str(key))
        url = wait_for(lambda: http_address(d.loaded.run_dir), 90, 0.1, "the HTTPS server up once the files exist")
        assert url.startswith("https://127.0.0.1:")
        import ssl

        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        assert httpx.get(f"{url}/healthz", verify=trusting, timeout=10).json() == {"status": "ok"}
    finally:
        d.close()


def test_fuzzed_requests_from_the_openapi_document_never_get_a_server_error(tmp_path):
    """schemathesis generates requests from /openapi.json — valid ones, and ones just past each constraint — and
    fails on any 5xx but the documented 503s; the log must hold no traceback either."""
    import subprocess
    import sys

    d, url = start(tmp_path, gates={"generation": {"queue_timeout_ms": 50}})
    try:
        with cardq.connect(d.config_path, name="test") as q:
            token = q.create_token("admin").token
        st = Path(sys.executable).parent / "st"
        r = subprocess.run([str(st), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {token}",
                            "--checks", "not_a_server_error", "--max-examples", "8", "--seed", "1",
                            "--exclude-path", "/v1/jobs/{id}/wait", "--no-color"],
                           capture_output=True, text=True, timeout=500, cwd=tmp_path)  # (its cache goes there)
        assert r.returncode == 0, r.stdout[-4000:]
        assert not [x for x in d.log_lines() if x.get("event") == "http.failed"]
        assert "Traceback" not in (tmp_path / "cardq.log").read_text()
    finally:
        d.close()


def test_a_stopping_server_answers_its_long_polls_instead_of_cutting_them(tmp_path):
    import threading

    d, url = start(tmp_path, workers={"count": 0})  # (the job stays queued; the HTTP server stops at once)
    try:
        with cardq.connect(d.config_path, name="test") as q:
            token = q.create_token("admin").token
        headers = {"Authorization": f"Bearer {token}"}
        job_id = httpx.post(f"{url}/v1/jobs", headers=headers, json={
            "user": "p", "plan": "enterprise", "items": [{"title": "never run"}]}).json()["ids"][0]
        answers: list[httpx.Response] = []
        poll = threading.Thread(target=lambda: answers.append(httpx.get(
            f"{url}/v1/jobs/{job_id}/wait", params={"timeout": 120}, headers=headers, timeout=150)))
        poll.start()
        wait_for(lambda: httpx.get(f"{url}/v1/status", headers=headers).json()["http"]["long_polls"] == 1, 60, 0.05,
                 "the long poll waiting")
        os.kill(d.procs[0].pid, signal.SIGTERM)
        poll.join(60)
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["job"]["id"] == job_id and not answers[0].json()["finished"]
        d.procs[0].wait(60)
        messages = [x for x in d.log_lines() if x.get("event") == "http.server_message"]
        assert not messages, messages
    finally:
        d.close()
