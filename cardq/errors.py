"""The errors a user can see. Each carries a one-line message and the CLI exit code it maps to.

Exit codes: 0 success, 2 usage/config/input error, 3 rejected by a limit, 1 any other failure.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LIMIT = 3


class CardqError(Exception):
    """Base: str(e) is a complete one-line message for the operator."""

    exit_code = EXIT_FAILURE


class ConfigError(CardqError):
    exit_code = EXIT_USAGE


class InputError(CardqError):
    """Bad input from the user: a file, a line, a value. The message names it and what is expected."""

    exit_code = EXIT_USAGE
