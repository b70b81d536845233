"""examples/node/, run with node against a real supervisor serving HTTP: the demo server (plain node:http behind the
cardq middleware) is rate-limited per client IP — a 429 with Retry-After and the RateLimit fields passed through —
and its requests arrive as traffic events; submit.js gets a batch's ids, and a batch over the plan's daily limit
as the typed CardqLimitError; with cardq unreachable the middleware fails open and says so once."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import cardq
from cardq.running import http_address

from conftest import wait_for
from supervision import Deployment

NODE = shutil.which("node")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
LIMIT = 3  # the ip:* policy's requests per window: the 4th is refused

pytestmark = [pytest.mark.skipif(NODE is None, reason="node is not on PATH: examples/node/ needs Node.js 18+ "
                                 "(.ci/run installs Debian's nodejs)"), pytest.mark.slow]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A supervisor with the HTTP API on a free port and a small rate limit per client IP; its URL and tokens."""
    dep = Deployment(tmp_path, http={"enabled": True, "listen": "127.0.0.1:0"},
                     ratelimit={"policies": {"ip:*": {"limit": LIMIT, "window_s": 3600}}})
    try:
        dep.start()
        url = wait_for(lambda: http_address(dep.loaded.run_dir), 90, 0.05, what="the HTTP server's address")
        with cardq.connect(dep.config_path, name="test") as q:
            app, read = q.create_token("app", "node example"), q.create_token("read", "test")
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_for(lambda: _ready(client), 90, 0.05, what="/readyz answering 200")
            yield {"url": url, "app": app.token, "read": read.token, "client": client}
    finally:
        dep.close()


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def demo_server(tmp_path: Path, cardq_url: str, token: str) -> Iterator[tuple[subprocess.Popen, Path, str]]:
    """examples/node/server.js on a free port: (its process, its output file, its URL); killed at the end."""
    out = tmp_path / "node-server.out"
    env = {**os.environ, "CARDQ_URL": cardq_url, "CARDQ_TOKEN": token, "PORT": "0", "HOST": "127.0.0.1"}
    with open(out, "wb") as sink:
        proc = subprocess.Popen([NODE, "server.js"], cwd=EXAMPLE, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        found = wait_for(lambda: proc.poll() is not None or re.search(r"listening on (http://\S+)", out.read_text()),
                         60, 0.05, what="server.js printing its port")
        assert proc.poll() is None, f"server.js exited ({proc.returncode}):\n{out.read_text()}"
        yield proc, out, found.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def submit(tmp_path: Path, served: dict[str, Any], name: str, items: list[dict], user: str, plan: str) -> tuple:
    """examples/node/submit.js: (exit code, what it printed on stdout as JSON, stderr)."""
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in items))
    env = {**os.environ, "CARDQ_URL": served["url"], "CARDQ_TOKEN": served["app"]}
    done = subprocess.run([NODE, "submit.js", "--user", user, "--plan", plan, str(path)], cwd=EXAMPLE, env=env,
                          capture_output=True, text=True, timeout=90)
    printed = orjson.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, printed, done.stderr


def path_counts(served: dict[str, Any], hours: set[int], path: str) -> dict[str, float]:
    """requests and status_4xx of one path over the given hours, from GET /v1/paths/top (a read token)."""
    total = {"requests": 0.0, "status_4xx": 0.0}
    for hour in hours:
        r = served["client"].get("/v1/paths/top", params={"hour": hour, "limit": 1000},
                                 headers={"Authorization": f"Bearer {served['read']}"})
        assert r.status_code == 200, r.text
        for row in r.json()["paths"]:
            if row["path"] == path:
                total = {k: total[k] + row[k] for k in total}
    return total


def current_hour() -> int:
    return int(time.time() // 3600 * 3600)


@pytest.mark.timeout(300)
def test_the_demo_server_is_rate_limited_per_ip_and_its_requests_arrive_as_events(tmp_path, served):
    hours = {current_hour()}  # and the hour at the end: the test may run across an hour's turn
    with demo_server(tmp_path, served["url"], served["app"]) as (_proc, out, node_url), \
            httpx.Client(base_url=node_url, timeout=30) as client:
        answers = [client.get(f"/cards/{n}", params={"q": "mug"}) for n in range(1, LIMIT + 2)]
        assert [r.status_code for r in answers] == [200] * LIMIT + [429], out.read_text()
        assert answers[0].json() == {"hello": "from node", "path": "/cards/1?q=mug"}
        remaining = [re.search(r";r=(\d+);", r.headers["ratelimit"]).group(1) for r in answers]
        assert remaining == [str(LIMIT - n) for n in range(1, LIMIT + 1)] + ["0"]  # passed through as cardq said
        refused = answers[-1]
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["ratelimit-policy"] == f'"ip:*";q={LIMIT};w=3600'
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["status"] == 429 and "127.0.0.1" in refused.json()["detail"]
        assert all(r.headers["x-request-id"] for r in answers)

        def arrived() -> dict[str, float] | None:
            counts = path_counts(served, hours | {current_hour()}, "/cards/:id")
            return counts if counts["requests"] >= LIMIT + 1 else None

        counts = wait_for(arrived, 90, 0.1, what="the demo server's 4 events in /v1/paths/top")
        assert counts == {"requests": LIMIT + 1, "status_4xx": 1}
        assert "unavailable" not in out.read_text()


@contextlib.contextmanager
def lossy_proxy(cardq_url: str) -> Iterator[tuple[str, list[list[dict]]]]:
    """A proxy in front of cardq that forwards everything, but answers the first POST /v1/events with a 502 after
    cardq took it (a response lost on the way back): (its URL, the event batches it forwarded)."""
    batches: list[list[dict]] = []
    upstream = httpx.Client(base_url=cardq_url, timeout=30)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            r = upstream.post(self.path, content=body, headers={k: self.headers[k] for k in ("Authorization",
                                                                                            "Content-Type")})
            status = r.status_code
            if self.path == "/v1/events":
                batches.append(orjson.loads(body))
                status = 502 if len(batches) == 1 else status
            self.send_response(status)
            for name in ("Content-Type", "Retry-After", "RateLimit-Policy", "RateLimit"):
                if name in r.headers:
                    self.send_header(name, r.headers[name])
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", batches
    finally:
        server.shutdown()
        server.server_close()
        upstream.close()


@pytest.mark.timeout(300)
def test_events_sent_again_after_a_lost_answer_are_counted_once(tmp_path, served):
    hours = {current_hour()}
    with lossy_proxy(served["url"]) as (proxy_url, batches), \
            demo_server(tmp_path, proxy_url, served["app"]) as (_proc, out, node_url), \
            httpx.Client(base_url=node_url, timeout=30) as client:
        assert [client.get(f"/orders/{n}").status_code for n in range(LIMIT)] == [200] * LIMIT
        wait_for(lambda: len(batches) >= 2, 90, 0.05, what="the middleware sending its events again")
        first, again = batches[0], batches[1]
        assert again[:len(first)] == first  # as they were: the same ts_ms and request_id, so the same ids

        def arrived() -> dict[str, float] | None:
            counts = path_counts(served, hours | {current_hour()}, "/orders/:id")
            return counts if counts["requests"] >= LIMIT else None

        assert wait_for(arrived, 90, 0.1, what="the events in /v1/paths/top") == {"requests": LIMIT, "status_4xx": 0}
        assert sum(len(b) for b in batches) > LIMIT  # some were sent twice, and counted once
        assert out.read_text().count("cardq unavailable (HTTP 502)") == 1, out.read_text()


@pytest.mark.timeout(300)
def test_a_batch_from_node_gets_its_ids_and_one_over_the_daily_limit_a_typed_error(tmp_path, served):
    code, printed, err = submit(tmp_path, served, "first", [{"title": f"Mug {n}"} for n in range(3)], "n1", "free")
    assert code == 0, err
    assert len(printed["ids"]) == 3 and printed["created"] == 3 and printed["existing"] == 0

    code, printed, err = submit(tmp_path, served, "second", [{"title": f"Mat {n}"} for n in range(3)], "n1", "free")
    assert code == 2, err
    assert printed["error"] == "CardqLimitError"
    assert {k: printed[k] for k in ("limit", "allowed", "current", "requested")} == {
        "limit": "daily.free", "allowed": 5, "current": 3, "requested": 3}
    assert printed["retryAfterS"] >= 1 and printed["resetsAt"] > time.time()
    assert "daily limit" in err


@pytest.mark.timeout(120)
def test_the_middleware_fails_open_and_says_so_once_when_cardq_is_unreachable(tmp_path):
    with socket.socket() as taken:  # bound, never listening: a connection to it is refused at once
        taken.bind(("127.0.0.1", 0))
        cardq_url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        with demo_server(tmp_path, cardq_url, "cq_no_such_token") as (proc, out, node_url), \
                httpx.Client(base_url=node_url, timeout=30) as client:
            assert [client.get(f"/cards/{n}").status_code for n in range(LIMIT + 2)] == [200] * (LIMIT + 2)
            proc.terminate()  # SIGTERM: the server closes, tries once more to send its events, and exits
            assert proc.wait(60) == 0, out.read_text()
    assert out.read_text().count("cardq unavailable") == 1, out.read_text()
