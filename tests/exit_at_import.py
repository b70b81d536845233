"""A handler module that calls sys.exit(0) when imported (it used to stop the supervisor with exit code 0)."""

import sys

sys.exit(0)
