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
from collections.abc import Iterable
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


def parse_assignments(items: Iterable[str], flag: str, *, numbers: bool = True, bare: float | None = None,
                      signed: bool = True, example: str = "calm=1") -> dict[str, Any]:
    """``NAME=VALUE`` items (repeatable, or comma-separated) -> ``{name: value}``, with one rule set.

    Why one parser: ``generate --steer``, the teach jobs' weights, ``export --concept`` and
    ``--method-param`` once parsed these four ways (``--steer calm=nan`` was accepted while
    ``teach`` refused it). The rules: a name is non-empty (spaces around it are dropped); with
    ``numbers`` a value must be a finite number (non-negative unless ``signed``) and a repeated
    name adds up; without, values stay strings (their owner checks their types) and a repeated
    name is an error; a bare ``NAME`` means ``bare`` when given, else it is an error.

    Args:
        items: the command-line items, e.g. ``["calm=2", "anxious=-1,sad=0.5"]``.
        flag: the parameter the items came from, named in every error (e.g. ``--steer``).
        numbers: parse values as finite floats (else keep them as stripped strings).
        bare: the value of an item with no ``=`` (None: such an item is an error).
        signed: allow negative numbers.
        example: a valid item, quoted in the error for a malformed one.

    Returns:
        The names in first-seen order with their values.

    Raises:
        FieldError: ``path`` is ``flag``; the message quotes the item at fault and what to do.
    """
    out: dict[str, Any] = {}
    for item in (part for it in items for part in str(it).split(",") if part.strip()):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not name or (not sep and bare is None):
            form = "NAME=NUMBER" if numbers else "NAME=VALUE"
            raise FieldError(flag, f"{item!r}: expected {form}{' or NAME' if bare is not None else ''}, e.g. {example}")
        if not numbers:
            if name in out:
                raise FieldError(flag, f"{item!r}: {name} is given twice; give it once")
            out[name] = value.strip()
            continue
        if sep:
            try:
                x = float(value)
            except ValueError:
                raise FieldError(flag, f"{item!r}: {value.strip()!r} is not a number") from None
        else:
            x = float(bare)
        if not math.isfinite(x) or (not signed and x < 0):
            raise FieldError(flag, f"{item!r}: expected a finite{'' if signed else ', non-negative'} number")
        out[name] = out.get(name, 0.0) + x
    return out
