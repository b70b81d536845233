"""cardq's actors: single-owner processes (Counter, RateLimiter, PathCollector), addressed by name and key.

Each shard of an actor is one process listening on its own Unix socket in the run directory (mode 0600).
Every client process — a worker, the CLI, an app on the VM — opens its own authenticated connection to each
shard it talks to. No channel is shared between two processes, so a process killed at any instant can only
break its own connections; a restarted actor listens on the same path and clients simply reconnect.
"""
