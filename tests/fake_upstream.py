"""A local stand-in for an OpenAI-compatible chat-completions API (the paid one cannot be reached from tests):
a real HTTP server on 127.0.0.1 whose answers a test scripts, one per request, and which records every request."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

GOOD_CARD = {"title": "Wireless earbuds", "bullets": ["30 h battery", "IPX4"], "seo_keywords": ["earbuds"],
             "description": "Bluetooth 5.3 earbuds."}


def completion(content: str, *, tokens: int = 42) -> dict[str, Any]:
    return {"id": "cmpl-1", "model": "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 7, "total_tokens": tokens + 7}}


class FakeUpstream:
    """Scripted answers: each is (status, body, headers, delay_s); when the script runs out, a good card — or,
    with `capacity`, an upstream of limited capacity: up to `capacity` requests at once are served in `service_s`
    each, and one past that is answered 503 at once (counted in `rejected`)."""

    def __init__(self, *, capacity: int | None = None, service_s: float = 0.0) -> None:
        self.script: list[tuple[int, bytes, dict[str, str], float]] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.capacity, self.service_s = capacity, service_s
        self.in_flight = self.most_in_flight = self.rejected = self.served = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with owner.lock:
                    owner.requests.append({"path": self.path, "body": orjson.loads(body),
                                           "authorization": self.headers.get("authorization")})
                    step, counted = (owner.script.pop(0), False) if owner.script else owner.unscripted()
                status, payload, headers, delay = step
                if delay:
                    time.sleep(delay)
                with owner.lock:
                    if counted:
                        owner.in_flight -= 1
                        owner.served += 1
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def unscripted(self) -> tuple[tuple[int, bytes, dict[str, str], float], bool]:
        """The answer when the script is empty, and whether it takes a place of the capacity (under the lock)."""
        good = (200, orjson.dumps(completion(orjson.dumps(GOOD_CARD).decode())), {}, self.service_s)
        if self.capacity is None:
            return good, False
        if self.in_flight >= self.capacity:
            self.rejected += 1
            return (503, orjson.dumps({"error": {"message": "overloaded"}}), {}, 0.0), False
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return good, True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def then(self, status: int, body: Any, headers: dict[str, str] | None = None, delay_s: float = 0.0) -> None:
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        with self.lock:
            self.script.append((status, payload, headers or {}, delay_s))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
