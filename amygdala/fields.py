"""Fields of a request or a job: the one error type for a bad field, and the one check of a number.

Why one error type: a bad field is the same failure whether a route, a training job or a steering
spec finds it, so callers catch one :class:`FieldError` and answer with its ``path`` (a 400 naming
the field, or the CLI's flag for it).

Why one place: JSON integers are unbounded in Python, and ``math.isfinite(10**400)`` raises
OverflowError rather than answering, so a check written ad hoc per field turns a client's huge
number into a server error instead of a field error. Every numeric field goes through these.
"""

from __future__ import annotations

import math
from typing import Any

from amygdala import AmygdalaError


class FieldError(AmygdalaError):
    """A bad field; ``path`` is where it is (e.g. ``samples[0].context_ids``, ``steer[0].strength``)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def is_int(x: Any) -> bool:
    """An integer, not a bool (``True`` is an int in Python, never a valid count or ID)."""
    return isinstance(x, int) and not isinstance(x, bool)


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (a bool is not); None otherwise.

    An integer too large for a float (10**400) is not finite here, rather than an OverflowError.
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def short(value: Any) -> str:
    """``repr(value)`` for an error message, cut short: a 400-digit integer would bury the message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
