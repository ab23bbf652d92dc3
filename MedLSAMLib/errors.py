"""Every exception type of MedLSAM. ``USER_ERRORS`` mean "the user's input is wrong": the CLI
reports them in one line (exit code 2), a batch records them as the case's failure."""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: unreadable file, not a CT, inconsistent template, ..."""


class GeometryError(ValueError):
    """Inconsistent or impossible geometric input (a user error, reported in one line)."""


class Cancelled(Exception):
    """A running job stopped because the user pressed Cancel (raised between slices)."""


#: Every exception type the CLI reports as a one-line user error.
USER_ERRORS = (InputError, GeometryError)
