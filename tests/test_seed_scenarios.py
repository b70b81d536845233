"""The CardMaker test scenarios (seed 001), end to end through the `cardq` command and a real supervisor."""

from __future__ import annotations

import subprocess

import orjson
import pytest

from conftest import wait_for
from supervision import CARDQ, Deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def d(tmp_path):
    dep = Deployment(tmp_path, workers={"count": 3, "handler": "cardq.cards:make_card"},
                     limits={"batch_max_items_per_request": 200, "batch_max_queued_per_user": 300})
    yield dep
    dep.close()


def items_file(d: Deployment, name: str, n: int, **extra) -> str:
    path = d.root / name
    path.write_text("".join(orjson.dumps({"description": f"Item {i}: cotton, 200 g, blue", "category": "clothing",
                                          "marketplace": "ozon", "style": "selling", **extra}).decode() + "\n"
                            for i in range(n)))
    return str(path)


def test_scenario_1_one_batch_of_50(d):
    out = d.cardq("submit", items_file(d, "batch.jsonl", 50), "--user", "user123", "--plan", "enterprise")
    assert out.returncode == 0 and len(out.stdout.split()) == 50
    assert d.cardq("supervise", "--burst").returncode == 0
    status = orjson.loads(d.cardq("status", "--json").stdout)
    assert status["jobs"]["done"] == 50 and status["today"]["done"] == 50
    card = d.job(int(out.stdout.split()[0]))["result"]
    assert card["marketplace"] == "ozon" and card["bullets"][0] == "Item 0: cotton"


def test_scenario_2_three_parallel_batches_are_interleaved(d):
    """Three users submit 50 each at the same moment; one worker then serves them in turn, not one user after
    another (CardMaker's global FIFO claimed this and did not do it)."""
    # One job per claim, so that started_at shows the claim order (a batch shares one started_at, and its jobs
    # would sort by id; the claim itself takes them in the same fair order).
    d.write_config(workers={"prefetch": 1})
    files = {u: items_file(d, f"{u}.jsonl", 50) for u in ("anna", "boris", "chen")}
    procs = [subprocess.Popen([CARDQ, "submit", f, "--user", u, "--plan", "enterprise", "-q"], env=d.env,
                              cwd=d.root, stdout=subprocess.PIPE, text=True) for u, f in files.items()]
    assert [p.communicate(timeout=60)[0].strip() for p in procs] == ["50", "50", "50"]
    assert d.cardq("supervise", "--burst", "--workers", "1").returncode == 0
    order = [u for (u,) in d.db.conn.execute("SELECT user_id FROM jobs ORDER BY started_at, id")]
    assert len(order) == 150
    for start in range(0, 150, 3):  # every run of three claims serves each user once
        assert sorted(order[start:start + 3]) == ["anna", "boris", "chen"]


def test_scenarios_4_5_per_user_limit_and_limits_changed_live(d):
    proc = d.start()  # a running supervisor: limits change under it, with no restart
    wait_for(lambda: d.supervisor_row(), 30)
    slow = items_file(d, "slow.jsonl", 1)
    assert d.cardq("limits", "set", "batch_max_queued_per_user", "3").returncode == 0
    d.cardq("limits", "set", "batch_max_items_per_request", "2")
    refused = d.cardq("submit", items_file(d, "three.jsonl", 3), "--user", "u1", "--plan", "enterprise")
    assert refused.returncode == 3 and "3 items, batch_max_items_per_request is 2" in refused.stderr
    d.cardq("limits", "unset", "batch_max_items_per_request")
    # Fill u1's queue with jobs that cannot finish yet (long simulated latency needs the cards option):
    d.write_config(cards={"simulate_latency_ms": 3000.0})
    assert d.cardq("reload").returncode == 0
    wait_for(lambda: d.supervisor_row()["info"]["config_version"] == 2, 10)
    three = items_file(d, "three-more.jsonl", 3)
    assert d.cardq("submit", three, "--user", "u1", "--plan", "enterprise").returncode == 0
    too_many = d.cardq("submit", slow, "--user", "u1", "--plan", "enterprise")
    assert too_many.returncode == 3 and "too many requests: user u1 has 3 jobs queued or processing" in \
        too_many.stderr
    assert d.cardq("submit", slow, "--user", "u2", "--plan", "enterprise").returncode == 0  # others unaffected
    assert d.cardq("limits", "set", "batch_max_queued_per_user", "10").returncode == 0  # live, no restart
    assert d.cardq("submit", slow, "--user", "u1", "--plan", "enterprise").returncode == 0
    proc.terminate()
    assert proc.wait(60) == 0


def test_scenario_6_daily_limit_is_per_plan_per_day(d):
    """Free plan: 5 a day. (That the count starts again at the next local midnight is tested with an injected
    clock in test_limits.py; a CLI run cannot move the clock.)"""
    five = items_file(d, "five.jsonl", 5)
    assert d.cardq("submit", five, "--user", "f", "--plan", "free").returncode == 0
    assert d.cardq("supervise", "--burst").returncode == 0
    again = d.cardq("submit", items_file(d, "one.jsonl", 1), "--user", "f", "--plan", "free")
    assert again.returncode == 3 and "has 5 jobs done today" in again.stderr and "plan free allows 5" in again.stderr
    assert d.cardq("submit", five, "--user", "f", "--plan", "basic").returncode == 0  # basic: 20 a day
