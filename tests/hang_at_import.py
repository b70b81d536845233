"""A handler module that hangs when imported (the supervisor must never import it itself)."""

import time

time.sleep(600)


def run(job):  # pragma: no cover - never reached
    return None
