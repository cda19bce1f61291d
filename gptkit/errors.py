"""The one exception type users see: a problem with their input, and how to fix it."""

from __future__ import annotations

import math
import shlex
from pathlib import Path


class GptkitError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""


class DivergedError(GptkitError):
    """Training produced a non-finite loss; the message says what diverged and what is on disk."""


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
    hint: str = "",
) -> None:
    """One place for the range checks of numeric options: finite, of the right kind, in range."""
    hint = f" ({hint})" if hint else ""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise GptkitError(
            f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise GptkitError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise GptkitError(
            f"{name} must be {bound}{'' if high is None else f' and <= {high:g}'}{hint}, got "
            f"{value}"
        )
    if high is not None and value > high:
        raise GptkitError(f"{name} must be <= {high:g}{hint}, got {value}")


def quote(path: str | Path) -> str:
    """A path as it must be typed in a shell command we print (spaces, quotes and all)."""
    return shlex.quote(str(path))
