"""Client processes for the actor tests (spawned: they import this module by name). Each writes its result to
a JSON file, so no result channel is shared between processes that may be killed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from cardq.actors.client import ActorClient
from cardq.config import load_config
from cardq.errors import ActorError, Overloaded


def client_for(config_path: str, name: str) -> ActorClient:
    return ActorClient.from_config(load_config(config_path), name=name)


def incr_loop(config_path: str, key: str, n: int, batch: int, out: str) -> None:
    """n increments of key, `batch` per pipelined ask, each with its own op id; a failed ask is retried with
    the SAME op ids until it answers. Records how many asks had to be retried."""
    client = client_for(config_path, f"incr-{os.getpid()}")
    retries = 0
    for start in range(0, n, batch):
        ops = [(key, "incr", {"key": key, "n": 1, "op_id": f"{os.getpid()}-{i}"})
               for i in range(start, min(n, start + batch))]
        while True:
            try:
                client.ask_many("counter", ops)
                break
            except ActorError:
                retries += 1
    resent = client.resent
    client.close()
    Path(out).write_bytes(orjson.dumps({"done": n, "retries": retries + resent}))


def hold_gate(config_path: str, gate: str, hold_s: float, out: str, ready: str | None = None) -> None:
    client = client_for(config_path, f"gate-{os.getpid()}")
    result: dict = {"pid": os.getpid()}
    try:
        with client.gate(gate):
            result["enter"] = time.time()
            if ready:
                Path(ready).write_text("held")
            time.sleep(hold_s)  # the work done while holding the permit
            result["exit"] = time.time()
    except Overloaded as e:
        result["overloaded"] = str(e)
    except ActorError as e:
        result["error"] = str(e)
    client.close()
    Path(out).write_bytes(orjson.dumps(result))


def send_events(config_path: str, events: list[dict], out: str) -> None:
    client = client_for(config_path, f"events-{os.getpid()}")
    rec = client.events
    for e in events:
        rec.record(**e)
    assert rec.flush(120)
    result = {"sent": rec.sent, "inbox": rec.to_inbox}
    client.close()
    Path(out).write_bytes(orjson.dumps(result))


def ask_forever(config_path: str, stop_file: str, out: str) -> None:
    """Counter and rate-limit asks in a loop until stop_file exists: the longest any one took, and how each
    ended (answered or an ActorError)."""
    client = client_for(config_path, f"chaos-{os.getpid()}")
    longest, answered, failed, n = 0.0, 0, 0, 0
    while not Path(stop_file).exists():
        n += 1
        started = time.monotonic()
        try:
            if n % 2:
                client.counter.incr("chaos", 1)
            else:
                client.ratelimit.check(f"k{n % 10}")
            answered += 1
        except ActorError:
            failed += 1
        longest = max(longest, time.monotonic() - started)
    client.close()
    Path(out).write_bytes(orjson.dumps({"longest_s": longest, "answered": answered, "failed": failed}))
