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
    """Scripted answers: each is (status, body, headers, delay_s); when the script runs out, a good card."""

    def __init__(self) -> None:
        self.script: list[tuple[int, bytes, dict[str, str], float]] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with owner.lock:
                    owner.requests.append({"path": self.path, "body": orjson.loads(body),
                                           "authorization": self.headers.get("authorization")})
                    step = owner.script.pop(0) if owner.script else (200, orjson.dumps(completion(
                        orjson.dumps(GOOD_CARD).decode())), {}, 0.0)
                status, payload, headers, delay = step
                if delay:
                    time.sleep(delay)
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
