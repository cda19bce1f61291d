"""The one exception type users see: a problem with their input, and how to fix it."""

from __future__ import annotations


class GptkitError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""
