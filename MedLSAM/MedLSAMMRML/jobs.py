"""The one background-job primitive of the Slicer layer: a function on a worker thread, polled
from the main thread (a QTimer in the panel and the effect), with progress and cancel.

Slicer's rule: MRML and Qt only on the main thread. So a job's function gets plain data (numpy
volumes, settings) and returns plain data; the main thread reads MRML before and writes it after.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from MedLSAMLib.errors import Cancelled


class BackgroundJob:
    """``fn(report)`` on its own worker thread. ``report(done, total)`` (called by ``fn`` between
    slices) updates ``progress`` and raises :class:`~MedLSAMLib.errors.Cancelled` once ``cancel()``
    was called (or ``cancel_event``, anything with ``is_set()``, is set). ``fn`` must not touch
    MRML or Qt."""

    def __init__(self, fn, cancel_event=None):
        self.progress = (0, 0)
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="MedLSAM")
        self._future = self._executor.submit(fn, self._report)

    def _report(self, done: int, total: int) -> None:
        self.progress = (done, total)
        if self.cancel_event.is_set():
            raise Cancelled()

    def cancel(self) -> None:
        self.cancel_event.set()

    def done(self) -> bool:
        return self._future.done()

    def wait(self, seconds: float) -> None:
        """Block up to ``seconds`` for the job (releases the GIL for the worker); never raises."""
        try:
            self._future.exception(timeout=seconds)
        except Exception:  # TimeoutError, or the job's own error: result() reports it
            pass

    def result(self, timeout=None):
        """The function's return value, or its exception re-raised here (on the main thread)."""
        try:
            return self._future.result(timeout)
        finally:
            self._executor.shutdown(wait=False)

    def outcome(self) -> tuple[str, object]:
        """What the job left, for a timer slot on the main thread, never raising:
        ``("running", None)``; ``("cancelled", None)`` once ``cancel()`` was called, even if the
        function finished anyway (a localization cannot stop midway; its result must not appear
        after the user cancelled or left the effect); ``("failed", one-line message)``;
        ``("done", result)``."""
        if not self.done():
            return "running", None
        if self.cancel_event.is_set():
            self._executor.shutdown(wait=False)
            return "cancelled", None
        try:
            return "done", self.result()
        except Cancelled:
            return "cancelled", None
        except Exception as exc:  # any error of the worker: shown to the user, never lost in a timer slot
            return "failed", error_line(exc)


def error_line(exc: BaseException) -> str:
    """One line for the status bar and the dialog: the message, or the exception's kind when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
