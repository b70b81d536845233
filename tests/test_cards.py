"""The built-in card handler: deterministic cards, permanent failures for items no retry can fix."""

from __future__ import annotations

import random

import msgspec
import pytest

from cardq.cards import MARKETPLACES, TransientError, build_card, make_card
from cardq.config import CardsConfig, Config
from cardq.errors import ConfigError
from cardq.handlers import Job, PermanentError, load_handler, noop

ITEM = {"title": "Merino wool winter hat", "description": "100% merino wool, double knit, one size, machine "
        "washable at 30 C", "category": "clothing", "marketplace": "wildberries", "style": "selling"}


def job(payload, **cards) -> Job:
    config = msgspec.structs.replace(Config(), cards=CardsConfig(**cards))
    return Job(1, "u", "free", "card", payload, 1, 5, config)


def test_card_fields_and_determinism():
    card = build_card(ITEM)
    assert card == build_card(dict(reversed(list(ITEM.items()))))  # same item, same card
    assert card["title"].startswith("Merino wool winter hat | Clothing")
    assert len(card["title"]) <= MARKETPLACES["wildberries"]["title_max"]
    assert card["bullets"] == ["100% merino wool", "Double knit", "One size", "Machine washable at 30 C"]
    assert "merino" in card["seo_keywords"] and "the" not in card["seo_keywords"]
    assert card["description"].startswith("Merino wool winter hat that makes every day easier.")


def test_title_is_clipped_per_marketplace():
    long = {**ITEM, "title": "x" * 300, "marketplace": "avito"}
    assert len(build_card(long)["title"]) == MARKETPLACES["avito"]["title_max"]


def test_description_alone_is_enough_and_defaults_apply():
    card = build_card({"description": "Steel thermos, 1 l, keeps hot 24 h"})
    assert card["marketplace"] == "generic" and card["style"] == "informative"
    assert card["title"].startswith("Steel thermos | General")


@pytest.mark.parametrize("item, message", [
    ({"category": "toys"}, "item has no description"),
    ({"description": "   "}, "item has no description"),
    ({**ITEM, "marketplace": "ebay"}, "marketplace 'ebay' unknown; expected one of: ozon, wildberries"),
    ({**ITEM, "style": "loud"}, "style 'loud' unknown"),
    ({**ITEM, "description": ["a", "list"]}, "field 'description' is list; expected text"),
])
def test_items_no_retry_can_fix_are_permanent_failures(item, message):
    with pytest.raises(PermanentError, match=message):
        build_card(item)


def test_failure_rate_makes_transient_failures():
    random.seed(3)
    outcomes = []
    for _ in range(400):
        try:
            make_card(job(ITEM, failure_rate=0.25))
            outcomes.append("ok")
        except TransientError:
            outcomes.append("fail")
    assert 60 < outcomes.count("fail") < 140
    assert all(make_card(job(ITEM, failure_rate=0.0)) for _ in range(50))


def test_load_handler():
    assert load_handler("cardq.cards:make_card") is make_card
    assert load_handler("cardq.handlers:noop") is noop
    with pytest.raises(ConfigError, match='cannot import nosuchmodule'):
        load_handler("nosuchmodule:f")
    with pytest.raises(ConfigError, match="cardq.cards has no function nope"):
        load_handler("cardq.cards:nope")
