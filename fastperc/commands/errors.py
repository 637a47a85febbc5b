"""Bad input from the user, reported as one line.

Every failure caused by the user's files or options is an :class:`InputError` whose message
names the option or path, what was expected and what was given; ``fastperc`` prints it as one
line on stderr and exits with code 2.
"""
from __future__ import annotations


class InputError(Exception):
    """Bad input from the user (a file, a folder, an option): reported as one line, exit code 2."""


def describe_error(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
