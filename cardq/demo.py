"""`cardq demo`: the main job end to end on the embedded defaults, in a fresh database under ./demo.

Submits the bundled example batch for several users on different plans (one hits the free plan's daily limit,
so the rejection shows), runs `cardq supervise --burst` (worker processes turn every item into a product card;
a progress bar on a terminal), then prints the status an operator would see and a few of the cards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cardq import app, render, running
from cardq.errors import CardqError, InputError
from cardq.inputs import parse_items, read_text
from store import LimitExceeded, queries
from store import submit as store_submit

# (user, plan, how many of the example items) — carol's free plan allows 5 a day, so her 12 are refused whole.
DEMO_USERS = (("alice", "professional", 12), ("bob", "basic", 12), ("carol", "free", 12), ("carol", "free", 5))


def example_items_path() -> Path:
    """examples/cards.jsonl next to cli.py (a source checkout: the README installs with `pip install -e .`)."""
    import cli

    path = Path(cli.__file__).resolve().parent / "examples" / "cards.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: example items not found; run from a cardq checkout or pass --items FILE")
    return path


def fresh_demo_dir(directory: Path) -> Path:
    """A demo folder with a default config and no database yet; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        (directory / f"cardq.db{suffix}").unlink(missing_ok=True)
    config = directory / "config.toml"
    config.write_text(app.DEFAULT_CONFIG_TEXT())
    return config


def run(directory: Path, items_path: Path | None, echo: Callable[[str], None]) -> None:
    config = fresh_demo_dir(directory)
    loaded = app.load(config)
    items_path = items_path or example_items_path()
    items = parse_items(read_text(str(items_path), items_path.name), items_path.name)
    echo(f"== fresh database {loaded.db_path}")
    with app.open_db(loaded, create=True) as db:
        for user, plan, n in DEMO_USERS:
            batch = [store_submit.NewJob(i.payload, i.idempotency_key, i.where) for i in items[:n]]
            try:
                result = store_submit.submit(db, batch, user_id=user, plan=plan,
                                             max_attempts=loaded.config.workers.max_attempts,
                                             configured=loaded.limit_values())
                echo(f"submit {n:>2} items for {user:<6} ({plan}): ok, job ids {result.ids[0]}..{result.ids[-1]}")
            except LimitExceeded as e:
                echo(f"submit {n:>2} items for {user:<6} ({plan}): REJECTED (exit code 3) - {e}")
    echo(f"\n== cardq supervise --burst ({loaded.config.workers.count} worker processes)")
    code = running.supervise(running.with_log_level(loaded, "warning"), workers=None, burst=True)
    if code != 0:
        raise CardqError(f"the supervisor exited with code {code}")
    with app.open_db(loaded) as db:
        data = queries.stats(db, loaded.limit_values())
        cards = queries.list_jobs(db, status="done", limit=3, newest_first=False)
        shown = [queries.get(db, job["id"]) for job in cards]
    data["config"] = {"file": loaded.source, "digest": loaded.digest, "error": None}
    echo("\n== cardq status")
    echo(render.status(data))
    echo("\n== a few generated cards (cardq jobs show ID)")
    for job in shown:
        card = job["result"]
        echo(f"job {job['id']} ({job['user_id']}, {card['marketplace']}, {card['style']}): {card['title']}")
        for bullet in card["bullets"]:
            echo(f"  - {bullet}")
        echo(f"  keywords: {', '.join(card['seo_keywords'])}")
