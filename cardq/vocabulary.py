"""Names every layer shares — job statuses, input formats, the priority range — as plain constants, in the lowest
layer with no imports, so that `cardq --help` can offer them without loading the store."""

ACTIVE_STATUSES = ("queued", "scheduled", "processing")
FINISHED = ("done", "dead", "cancelled")
STATUSES = (*ACTIVE_STATUSES, *FINISHED)
FORMATS = ("auto", "jsonl", "json", "csv")  # what `submit` reads
MAX_PRIORITY = 1_000_000
