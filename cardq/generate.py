"""The card generator for real: asks an OpenAI-compatible chat-completions API (config `[upstream]`) for the card
{title, bullets, seo_keywords, description}, with a JSON-schema response format, and checks what comes back.

Upstream answers become job outcomes, so that the queue — not the handler — waits and retries:
- 429 or 503 with Retry-After: RetryAfter (the retry is scheduled no earlier than that);
- a timeout (request_timeout_ms), a connection error, 429/503 without Retry-After, any other 5xx: UpstreamError,
  an ordinary failure, retried with backoff and jitter;
- 400, 401, 403, 404, 422: PermanentError with the upstream's own message (retrying would not change it);
- output that is not the card (not JSON, or failing the schema): asked once more at once; a second failure is a
  PermanentError that keeps the raw text (truncated) in the job's error history.
The result carries `_meta`: the model, the token usage and the request's latency.

HTTP is httpx: a connection pool kept per worker process (and per base_url and timeout), timeouts on connect,
read and write, and HTTP/1.1 keep-alive, none of which is ours to write. The API key is read from the environment
variable named by upstream.api_key_env at each request, so a rotated key applies without a restart.
"""

from __future__ import annotations

import email.utils
import functools
import os
import time
from typing import Any

import msgspec
import orjson

from cardq.config import resolve_path
from cardq.handlers import Job, PermanentError, RetryAfter

RAW_KEEP = 500  # characters of a bad output kept in the error
PERMANENT_STATUSES = {400, 401, 403, 404, 422}

CARD_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "bullets": {"type": "array", "items": {"type": "string"}},
        "seo_keywords": {"type": "array", "items": {"type": "string"}},
        "description": {"type": "string"},
    },
    "required": ["title", "bullets", "seo_keywords", "description"],
    "additionalProperties": False,
}

DEFAULT_PROMPT = (
    "Write a product card for the {marketplace} marketplace in a {style} style.\n"
    "Product title: {title}\nCategory: {category}\nWhat we know about it: {description}\n"
    "Answer with the card as JSON: a title, 3 to 5 bullets, 5 to 10 seo_keywords and a description."
)
SYSTEM_PROMPT = "You write accurate, concise product cards for online marketplaces. Never invent specifications."


class Card(msgspec.Struct, forbid_unknown_fields=True):
    title: str
    bullets: list[str]
    seo_keywords: list[str]
    description: str


class UpstreamError(Exception):
    """The upstream failed this time (timeout, 5xx, overloaded): an ordinary failure, retried with backoff.
    `overload`: it was the upstream's load (a timeout, 429, 503, 504) — an adaptive gate cuts its limit."""

    def __init__(self, message: str, *, overload: bool = False):
        super().__init__(message)
        self.overload = overload


def generate(job: Job) -> dict[str, Any]:
    """Handler: "cardq.cards:generate"."""
    up = job.config.upstream
    if not up.base_url:
        raise PermanentError("upstream.base_url is not set in config.toml: the generator has no API to ask "
                             "(or use workers.handler = \"cardq.cards:make_card\", the offline one)")
    item = job.payload
    if not isinstance(item.get("title") or item.get("description"), str):
        raise PermanentError('the item has neither "title" nor "description" (text): nothing to write a card about')
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": _prompt(job).format_map(_Fields(item))}]
    body = {"model": up.model, "messages": messages, "max_tokens": up.max_tokens,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "card", "schema": CARD_SCHEMA, "strict": True}}}
    first_error = None
    usage: dict[str, Any] = {}  # both asks' tokens, when the first answer was not the card
    while True:  # an output that is not the card is asked for once more, at once
        started = time.monotonic()
        answer = _post(up, body)
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        text, used = _content(answer)
        usage = _add_usage(usage, used)
        try:
            card = msgspec.convert(orjson.loads(text), Card, strict=True)
        except (orjson.JSONDecodeError, msgspec.ValidationError) as e:
            if first_error is not None:
                raise PermanentError(f"the upstream's output failed the card schema twice ({first_error}; then "
                                     f"{e}); raw: {text[:RAW_KEEP]!r}") from None
            first_error = str(e)
            continue
        return {**msgspec.to_builtins(card), "_meta": {"model": answer.get("model", up.model), "usage": usage,
                                                       "latency_ms": latency_ms}}


def _post(up: Any, body: dict[str, Any]) -> dict[str, Any]:
    import httpx  # here: only workers that generate load it (~90 ms)

    key = os.environ.get(up.api_key_env, "")
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    try:
        r = _client(up.base_url.rstrip("/"), up.request_timeout_ms).post("/chat/completions",
                                                                          content=orjson.dumps(body), headers=headers)
    except httpx.TimeoutException:
        raise UpstreamError(f"upstream timeout: no answer within request_timeout_ms={up.request_timeout_ms}",
                            overload=True) from None
    except httpx.HTTPError as e:
        raise UpstreamError(f"upstream unreachable: {type(e).__name__}: {e}") from None
    if r.status_code == 200:
        try:
            return orjson.loads(r.content)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"upstream answered 200 with a body that is not JSON: {r.text[:200]!r}") from None
    message = _error_message(r)
    if r.status_code in (429, 503):
        wait = _retry_after(r.headers.get("retry-after"))
        if wait is not None:
            raise RetryAfter(wait, f"upstream {r.status_code}: {message}")
        raise UpstreamError(f"upstream {r.status_code}: {message}", overload=True)
    if r.status_code in PERMANENT_STATUSES:
        raise PermanentError(f"upstream {r.status_code}: {message}")
    raise UpstreamError(f"upstream {r.status_code}: {message}", overload=r.status_code == 504)


@functools.lru_cache(maxsize=4)
def _client(base_url: str, timeout_ms: int) -> Any:
    """One pooled client per worker process, base URL and timeout (a reload that changes either gets its own)."""
    import httpx

    return httpx.Client(base_url=base_url, timeout=timeout_ms / 1000,
                        limits=httpx.Limits(max_connections=8, max_keepalive_connections=4))


def _content(answer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    try:
        text = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UpstreamError(f"upstream answer has no choices[0].message.content: "
                            f"{orjson.dumps(answer)[:200]!r}") from None
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    return (text if isinstance(text, str) else ""), usage


def _add_usage(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Token counts summed field by field (other fields: the latest)."""
    out = {**total, **more}
    for k, v in more.items():
        if type(v) is int and type(total.get(k)) is int:
            out[k] = total[k] + v
    return out


def _error_message(r: Any) -> str:
    """The upstream's own words ({"error": {"message": ...}} in OpenAI's shape), else the start of the body."""
    try:
        err = orjson.loads(r.content).get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:300]
        if isinstance(err, str):
            return err[:300]
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return r.text[:300] or r.reason_phrase


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _prompt(job: Job) -> str:
    """The prompt for the item's marketplace and style: from upstream.prompts_dir if set, else the built-in."""
    folder = job.config.upstream.prompts_dir
    if not folder:
        return DEFAULT_PROMPT
    base = resolve_path(folder, job.config_dir)
    market, style = str(job.payload.get("marketplace", "generic")), str(job.payload.get("style", "selling"))
    for name in (f"{market}.{style}.txt", f"{market}.txt", "default.txt"):
        path = base / name
        if path.is_file():
            return path.read_text()
    return DEFAULT_PROMPT


class _Fields(dict):
    """The item's fields for the prompt; a field the item lacks reads as "-" (a prompt never fails on it)."""

    def __init__(self, item: dict[str, Any]):
        super().__init__(title=item.get("title") or "", description=item.get("description") or item.get("title"),
                         category=item.get("category") or "-", marketplace=item.get("marketplace") or "generic",
                         style=item.get("style") or "selling")

    def __missing__(self, key: str) -> str:
        return "-"
