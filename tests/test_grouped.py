"""Calls grouped by the HTTP server (cardq/web/app.py Grouped) and the API calls a group makes: each call answered
on its own, in order, as if it had been made alone."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import cardq
from cardq.errors import InputError, StoreBusy
from cardq.web.app import Grouped

from supervision import Deployment


class FakeWeb:
    def __init__(self):
        self.pool = ThreadPoolExecutor(4)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def test_groups_answer_each_call_in_its_place_within_the_cap():
    groups: list[list[int]] = []
    gate = threading.Event()

    def many(args: list[int]) -> list[object]:
        gate.wait(5)  # the first group holds the pool while the others arrive
        groups.append(args)
        if 13 in args:
            raise StoreBusy("locked")
        return [ValueError(a) if a % 5 == 0 else a * 10 for a in args]

    async def main() -> list[object]:
        grouped = Grouped(FakeWeb(), many, cap=6, weight=lambda a: 2 if a == 7 else 1)

        async def one(a: int) -> object:
            try:
                return await grouped(a)
            except Exception as e:
                return e

        calls = [asyncio.ensure_future(one(a)) for a in range(1, 16)]
        async with asyncio.timeout(30):  # until the first group (6) is in `many`, held by the gate, and 9 wait
            while len(grouped.waiting) != 9:
                await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert groups == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15]]  # in order, each within the cap
    failed = next(g for g in groups if 13 in g)
    for a, answer in zip(range(1, 16), answers, strict=True):
        if a in failed:
            assert isinstance(answer, StoreBusy)
        elif a % 5 == 0:
            assert isinstance(answer, ValueError) and answer.args == (a,)
        else:
            assert answer == a * 10


def event(i: int, ts_ms: int) -> dict:
    return {"path": f"/cards/{i}", "status": 200, "response_ms": 1.5, "client_ip": "10.0.0.1", "request_id": f"r{i}",
            "ts_ms": ts_ms}


def test_record_events_many_answers_each_array_on_its_own(tmp_path):
    d = Deployment(tmp_path, workers={"count": 0})
    try:
        d.start()
        d.wait_for_actor("paths")
        now = int(time.time() * 1000)
        with cardq.connect(d.config_path, name="test") as q:
            first = [event(i, now) for i in range(3)]
            out = q.record_events_many([first, [event(9, now), {"path": "nope"}], first[1:] + [event(5, now)]])
            a, bad, c = out
            assert (a.accepted, a.duplicates, a.to_inbox) == (3, 0, 0) and len(set(a.ids)) == 3
            assert isinstance(bad, InputError) and bad.where.startswith("events[1]")
            assert (c.accepted, c.duplicates) == (1, 2) and c.ids[:2] == a.ids[1:]  # the same ids: counted once
            assert q.record_events(first).duplicates == 3  # as record_events sees them
    finally:
        d.close()


def test_record_events_many_keeps_what_no_collector_takes_in_the_inbox(tmp_path):
    cardq.init(tmp_path / "config.toml")  # no supervisor: no collector
    with cardq.connect(tmp_path / "config.toml", name="test") as q:
        now = int(time.time() * 1000)
        a, b = q.record_events_many([[event(1, now), event(2, now)], [event(3, now)]])
        assert (a.to_inbox, a.accepted, b.to_inbox) == (2, 0, 1)
        with pytest.raises(InputError):
            q.record_events([{"path": "nope"}])
