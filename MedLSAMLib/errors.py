"""Exceptions that mean "the user's input is wrong" (reported in one line, exit code 2)."""
from __future__ import annotations

from .geometry import GeometryError


class InputError(ValueError):
    """Bad user input: unreadable file, not a CT, inconsistent template, ..."""


#: Every exception type the CLI reports as a one-line user error.
USER_ERRORS = (InputError, GeometryError)
