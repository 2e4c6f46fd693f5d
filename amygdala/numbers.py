"""The one check of a number that came from JSON, shared by every route and every job field.

Why one place: JSON integers are unbounded in Python, and ``math.isfinite(10**400)`` raises
OverflowError rather than answering, so a check written ad hoc per field turns a client's huge
number into a server error instead of a field error. Every numeric field goes through these.
"""

from __future__ import annotations

import math
from typing import Any


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
