"""`cardq demo`: the main job end to end on the embedded defaults, in a fresh database under ./demo.

Submits the bundled example batch for several users on different plans (one hits the free plan's daily limit,
so the rejection shows), runs `cardq supervise --burst` (worker processes turn every item into a product card;
a progress bar on a terminal), then prints the status an operator would see and a few of the cards. It uses
the public API only, as an app would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cardq
from cardq import app, render
from cardq.errors import InputError, LimitExceeded

# (user, plan, how many of the example items) — carol's free plan allows 5 a day, so her 12 are refused whole.
DEMO_USERS = (("alice", "professional", 12), ("bob", "basic", 12), ("carol", "free", 12), ("carol", "free", 5))


def example_items_path() -> Path:
    """The example items shipped inside the package (cardq/examples/cards.jsonl), installed or not."""
    path = Path(__file__).resolve().parent / "examples" / "cards.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: example items not found (a broken install?); pass --items FILE")
    return path


def fresh_demo_dir(directory: Path) -> Path:
    """A demo folder with a default config and no database yet; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        (directory / f"cardq.db{suffix}").unlink(missing_ok=True)
    config = directory / "config.toml"
    config.write_text(app.DEFAULT_CONFIG_TEXT())
    return config


def run(directory: Path, items_path: Path | None, echo: Callable[[str], None],
        supervise_burst: Callable[[cardq.Queue], None]) -> None:
    """`supervise_burst(q)` runs the supervisor until every job is done (the CLI's, with its progress bar)."""
    config = fresh_demo_dir(directory)
    items = cardq.read_items(items_path or example_items_path())
    cardq.init(config)
    with cardq.connect(config, name="demo") as q:
        echo(f"== fresh database {q.config.db_path}")
        for user, plan, n in DEMO_USERS:
            try:
                batch = q.submit(items[:n], user=user, plan=plan)
                echo(f"submit {n:>2} items for {user:<6} ({plan}): ok, job ids {batch.ids[0]}..{batch.ids[-1]}")
            except LimitExceeded as e:
                echo(f"submit {n:>2} items for {user:<6} ({plan}): REJECTED (exit code 3) - {e}")
        echo(f"\n== cardq supervise --burst ({q.config.config.workers.count} worker processes)")
        supervise_burst(q)
        data = q.status()
        cards = [q.job(job.id) for job in reversed(q.jobs(status="done", limit=3).jobs)]
    echo("\n== cardq status")
    echo(render.status(data))
    echo("\n== a few generated cards (cardq jobs show ID)")
    for job in cards:
        card = job.result
        echo(f"job {job.id} ({job.user_id}, {card['marketplace']}, {card['style']}): {card['title']}")
        for bullet in card["bullets"]:
            echo(f"  - {bullet}")
        echo(f"  keywords: {', '.join(card['seo_keywords'])}")
