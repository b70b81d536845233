"""The asyncio actor client (actors/aioclient.py) behind Queue.ratelimit.check_async, against a real supervisor:
the same decisions as the thread-side client, one connection per shard shared by a loop's tasks, a killed
actor reconnected to, and no supervisor said at once."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import cardq
from cardq.actors.protocol import socket_path
from cardq.errors import ActorError, ActorUnavailable
from cardq.store import processes as store_processes

from conftest import wait_for
from supervision import Deployment, pid_gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
POLICY = {"policies": {"t:*": {"limit": 5, "window_s": 10.0, "burst": 5}}}


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path, workers={"count": 0}, ratelimit=POLICY,
                   supervisor={"max_restarts": 1000, "restart_backoff_max_s": 0.05})
    yield d
    d.close()


def actor_pid(d: Deployment, name: str) -> int:
    return next(r["pid"] for r in d.db.read(store_processes.read) if r["name"] == name)


def test_concurrent_async_checks_decide_as_sync_ones_on_one_connection(deployment):
    d = deployment
    d.start()
    d.wait_for_actor("ratelimit")
    with cardq.connect(d.config_path, name="test") as q:

        async def main() -> list[cardq.RateLimitDecision]:
            # 60 checks of 6 keys at once: they travel together, each key's order kept
            return await asyncio.gather(*(q.ratelimit.check_async(f"t:{i % 6}") for i in range(60)))

        decisions = asyncio.run(main())
        for k in range(6):
            mine = decisions[k::6]
            assert [x.allowed for x in mine] == [True] * 5 + [False] * 5
            assert [x.remaining for x in mine[:5]] == [4, 3, 2, 1, 0]
            assert mine[0].policy == "t:*" and mine[0].limit == 5 and mine[0].window_s == 10.0
            assert 1.9 < mine[5].retry_after_s <= 2.0
        # the same state as the thread-side client sees
        assert q.ratelimit.check("t:0").allowed is False
        assert q.ratelimit.check("other").limit == 60
        [(_, client)] = q._loop_clients.values()
        assert list(client._links) == [("ratelimit", 0)]  # one connection served the 60

        async def refused() -> None:
            await q.ratelimit.check_async("t:9", cost=6)

        with pytest.raises(ActorError, match="cost 6: expected 1 to 5"):
            asyncio.run(refused())


def test_async_checks_go_on_after_the_actor_is_killed(deployment):
    d = deployment
    d.start()
    d.wait_for_actor("ratelimit")
    with cardq.connect(d.config_path, name="test") as q:

        async def main() -> tuple[list[bool], list[bool]]:
            first = [x.allowed for x in await asyncio.gather(*(q.ratelimit.check_async("t:a") for _ in range(3)))]
            old = actor_pid(d, "ratelimit-0")
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: pid_gone(old), 30, what="the killed actor gone")  # (its connection breaks: resent)
            # the state was committed before the answers: the restarted actor goes on from it
            later = [x.allowed for x in await asyncio.gather(*(q.ratelimit.check_async("t:a") for _ in range(4)))]
            return first, later

        first, later = asyncio.run(main())
        assert first == [True] * 3
        assert later == [True, True, False, False]


def test_no_supervisor_is_said_at_once_or_allowed_when_asked(tmp_path):
    d = Deployment(tmp_path, workers={"count": 0})
    try:
        cardq.init(d.config_path)  # the key file, as `cardq init` leaves it: no actor listens
        assert not socket_path(d.loaded.run_dir, "ratelimit", 0).exists()
        with cardq.connect(d.config_path, name="test") as q:

            async def deny() -> None:
                await q.ratelimit.check_async("k")

            with pytest.raises(ActorUnavailable, match="no supervisor runs"):
                asyncio.run(deny())

            async def allow() -> cardq.RateLimitDecision:
                return await q.ratelimit.check_async("k", on_unavailable="allow")

            decision = asyncio.run(allow())
            assert decision.allowed and decision.unavailable
            assert q.ratelimit.allowed_unavailable == 1
    finally:
        d.close()
