"""cardq's store: a narrow, documented contract over rows in one SQLite file (WAL, apsw).

It knows nothing of processes, actors or the CLI. Each public function says what it guarantees atomically.
Modules: db (connection, pragmas, transactions), schema (versions), jobs (the job state machine), submit
(inserting batches under limits), admin (operator actions), queries (reads), limits, usage, fairness.
"""

from cardq.store.db import Database

from cardq.errors import (
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    LimitExceeded,
    StoreBusy,
    StoreError,
)

__all__ = ["Database", "InvalidTransition", "JobNotFound", "LeaseLost", "LimitExceeded", "StoreBusy", "StoreError"]
