"""The built-in handler: a product-card generator that works offline and deterministically.

From an item {title or description, category, marketplace, style} it builds a card
{title, bullets, seo_keywords, description}. The same item always gives the same card. An item without a
description (and without a title to fall back on) is a permanent failure, not a retry. `[cards]` options add
latency and random transient failures for load and stress runs.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from typing import Any

from cardq.generate import generate  # noqa: F401 - the real generator, "cardq.cards:generate" (an upstream API)
from cardq.handlers import Job, PermanentError

MARKETPLACES = {
    "ozon": {"title_max": 200, "bullets": 5},
    "wildberries": {"title_max": 60, "bullets": 5},
    "yandex_market": {"title_max": 150, "bullets": 4},
    "avito": {"title_max": 50, "bullets": 3},
    "generic": {"title_max": 120, "bullets": 4},
}
STYLES = {
    "selling": ("Why you'll love it", "{} that makes every day easier"),
    "informative": ("Specifications", "{}: what you need to know"),
    "premium": ("Crafted details", "{}, made to last"),
    "minimal": ("Key facts", "{}"),
}
_STOPWORDS = {"and", "the", "with", "for", "from", "a", "an", "of", "to", "in", "on", "at", "by", "or", "is",
              "one", "two", "each", "both", "as", "all"}


class TransientError(Exception):
    """A simulated upstream failure (cards.failure_rate): retried with backoff."""


def make_card(job: Job) -> dict[str, Any]:
    item = job.payload
    opts = job.config.cards
    if opts.simulate_latency_ms:
        time.sleep(opts.simulate_latency_ms / 1000)
    if opts.failure_rate and random.random() < opts.failure_rate:
        raise TransientError(f"simulated upstream failure (cards.failure_rate={opts.failure_rate})")
    return build_card(item)


def build_card(item: dict[str, Any]) -> dict[str, Any]:
    """The card for one item; PermanentError naming the field when the item cannot make one."""
    description = _text(item, "description")
    title = _text(item, "title")
    if not description and not title:
        raise PermanentError("item has no description (nor a title to build one from); expected a 'description'")
    if not description:
        description = title
    marketplace = (_text(item, "marketplace") or "generic").lower()
    if marketplace not in MARKETPLACES:
        raise PermanentError(f"marketplace {marketplace!r} unknown; expected one of: {', '.join(MARKETPLACES)}")
    style = (_text(item, "style") or "informative").lower()
    if style not in STYLES:
        raise PermanentError(f"style {style!r} unknown; expected one of: {', '.join(STYLES)}")
    category = _text(item, "category") or "general"
    rules = MARKETPLACES[marketplace]
    heading, pattern = STYLES[style]

    base_title = title or _first_clause(description)
    card_title = _clip(f"{base_title} | {category.capitalize()}", rules["title_max"])
    facts = [f.strip().rstrip(".") for f in re.split(r"[,;.]\s+", description) if f.strip()]
    bullets = [f"{f[0].upper()}{f[1:]}" for f in facts][: rules["bullets"]]
    keywords = _keywords(f"{title} {description} {category}")
    body = " ".join([
        pattern.format(base_title) + ".",
        f"{heading}: " + "; ".join(b.lower() for b in bullets) + ".",
        f"Category: {category}. Marketplace: {marketplace}.",
    ])
    return {
        "title": card_title,
        "bullets": bullets,
        "seo_keywords": keywords,
        "description": body,
        "marketplace": marketplace,
        "style": style,
        "fingerprint": hashlib.sha256(repr(sorted(item.items())).encode()).hexdigest()[:12],
    }


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise PermanentError(f"field {key!r} is {type(value).__name__}; expected text")
    return str(value).strip()


def _first_clause(text: str) -> str:
    return re.split(r"[,;.]", text, maxsplit=1)[0].strip()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _keywords(text: str, limit: int = 8) -> list[str]:
    seen: dict[str, int] = {}
    for word in re.findall(r"[^\W\d_][\w-]{2,}", text.lower()):
        if word not in _STOPWORDS:
            seen[word] = seen.get(word, 0) + 1
    return [w for w, _ in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))][:limit]
