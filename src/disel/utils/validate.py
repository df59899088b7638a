"""Config checks that turn a bad value into one clear `UserError` sentence naming it and the fix."""

from __future__ import annotations

import math

from ..errors import UserError


def check_int(
    name: str,
    value: object,
    lo: int = 1,
    hi: int | None = None,
    *,
    problem: str = "is invalid",
    fix: str = "use a positive integer",
) -> int:
    """Return ``value`` if it is an int (bools excluded) in ``[lo, hi]``, else raise ``"NAME=VALUE PROBLEM: FIX."``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise UserError(f"{name}={value!r} {problem}: {fix}.")
    return value


def check_finite(
    name: str,
    value: object,
    *,
    problem: str = "is not a finite number",
    fix: str = "pass a number such as 3.0",
) -> float:
    """Return ``value`` if it is a finite int or float (bools excluded), else raise like :func:`check_int`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name}={value!r} {problem}: {fix}.")
    return value
