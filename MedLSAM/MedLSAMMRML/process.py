"""Long work in a child process (``python -m MedLSAMLib.worker``), polled from the main thread.

Why a process and not a thread of Slicer's: Slicer holds Python's lock while its event loop runs,
so a worker thread gets it only while the main thread runs Python; a process runs at full speed,
a crash costs one case instead of Slicer, and Cancel stops it at once (docs/slicer-behaviour.md).
SlicerTotalSegmentator and SlicerMONAIAuto3DSeg run their models the same way.

:class:`ProcessJob` has the surface of :class:`~MedLSAMMRML.jobs.BackgroundJob` (``progress``,
``done()``, ``cancel()``, ``wait()``, ``outcome()``); :class:`CohortProcessRun` has the surface of
:class:`~MedLSAMMRML.logic.CohortRun`. MRML is read (volumes written to files) before a job
starts and written (results loaded back) after, on the main thread; the child sees files only.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import MedLSAMLib
from MedLSAMLib.errors import USER_ERRORS
from MedLSAMLib.io import case_name, read_labels, write_volume
from MedLSAMLib.results import CaseRecord

from .nodes import volume_from_node

STDERR_FILE = "worker.log"


def worker_python() -> str:
    """The Python that runs the worker: Slicer's ``PythonSlicer`` launcher (it sets up Slicer's
    environment), else this interpreter (outside the application)."""
    return shutil.which("PythonSlicer") or sys.executable


class ProcessJob:
    """One MedLSAMLib.worker job. ``result`` of ``outcome()`` is the job's ``"out"`` path."""

    def __init__(self, job: dict, work_dir: Path, python: str | None = None):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.job = job
        self.progress = (0, 0)
        self.cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._error: str | None = None
        job_file = self.work_dir / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ)
        # the child imports the same MedLSAMLib as this process (inside Slicer: the extension's copy)
        package_parent = str(Path(MedLSAMLib.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in [env.get("PYTHONPATH")] if p])
        self._log = open(self.work_dir / STDERR_FILE, "wb")
        self.process = subprocess.Popen(
            [python or worker_python(), "-m", "MedLSAMLib.worker", str(job_file)], stdout=subprocess.PIPE,
            stderr=self._log, stdin=subprocess.DEVNULL, env=env, cwd=str(self.work_dir),
            start_new_session=os.name == "posix")  # its own process group: cancel stops its children too
        self._reader = threading.Thread(target=self._read, name="MedLSAM worker output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Reader thread: one event per stdout line (other lines, if a library prints, are skipped)."""
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or "event" not in event:
                continue
            if event["event"] == "slices":
                self.progress = (event["done"], event["total"])
            elif event["event"] == "error":
                self._error = event.get("message")
            self._events.put(event)
        self.process.stdout.close()

    # -- main thread --------------------------------------------------------------------------
    def events(self) -> list[dict]:
        """The events that arrived since the last call."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def done(self) -> bool:
        return self.process.poll() is not None and not self._reader.is_alive()

    def wait(self, seconds: float) -> None:
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return
        self._reader.join(timeout=seconds)

    def cancel(self) -> None:
        """Stop the worker now (and anything it started)."""
        self.cancelled = True
        if self.process.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:
                    self.process.kill()
            except (ProcessLookupError, PermissionError):
                pass

    def failure(self) -> str:
        """Why the worker failed, in one line: its own error event, else its exit and last log line."""
        if self._error:
            return self._error
        if not self._log.closed:
            self._log.flush()
        lines = [l for l in (self.work_dir / STDERR_FILE).read_text(errors="replace").splitlines() if l.strip()]
        code = self.process.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        return f"the MedLSAM worker process {how}" + (f": {lines[-1].strip()}" if lines else "")

    def outcome(self) -> tuple[str, object]:
        """As BackgroundJob.outcome: running, cancelled, failed (one line) or done (the "out" path)."""
        if not self.done():
            return "running", None
        self._log.close()
        if self.cancelled:
            return "cancelled", None
        if self.process.returncode != 0 or self._error:
            return "failed", self.failure()
        return "done", Path(self.job["out"])


def volume_file(volume_node, folder: Path, name: str) -> Path:
    """Main thread: the node's voxels and geometry as an NRRD file for the worker."""
    path = Path(folder) / f"{name}.nrrd"
    write_volume(volume_from_node(volume_node), path, compress=False)
    return path


class CohortProcessRun:
    """The panel's cohort run in a worker process: ``poll()`` from a timer until it returns False.

    ``results``: one :class:`~MedLSAMMRML.logic.VolumeResult` per volume so far, in input order;
    a finished case is loaded into '<volume> MedLSAM' as soon as the worker reports it.
    ``cancel()`` stops the worker at once: finished cases stay, the others are ``cancelled``. A
    worker that dies fails its unfinished cases with the reason, never the panel."""

    def __init__(self, core, volume_nodes, settings, progress_callback=None, python: str | None = None,
                 work_dir: Path | None = None):
        from .logic import VolumeResult

        self.core = core
        self.nodes = list(volume_nodes)
        self.settings = settings
        self.progress_callback = progress_callback
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="MedLSAM-run-"))
        self._slots: list = [None] * len(self.nodes)
        self._case_index = 0
        self._done = False
        files, self._file_index = [], {}
        for n, node in enumerate(self.nodes):  # MRML read: main thread, before the worker starts
            try:
                path = volume_file(node, self.work_dir / "input", f"case{n:04d}")
            except USER_ERRORS as exc:
                self._slots[n] = VolumeResult(node.GetName(), "failed", error=str(exc))
                continue
            files.append(str(path))
            self._file_index[case_name(path)] = n
        self._structures = None
        self.job = None
        if files:
            self.job = ProcessJob({"kind": "cohort", "settings": settings.to_json(), "images": files,
                                   "out": str(self.work_dir / "out")}, self.work_dir, python)

    @property
    def results(self) -> list:
        return [r for r in self._slots if r is not None]

    @property
    def slices(self) -> tuple[int, int]:
        return self.job.progress if self.job is not None else (0, 0)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def wait(self, seconds: float) -> None:
        if self.job is not None:
            self.job.wait(seconds)

    def poll(self) -> bool:
        if self._done:
            return False
        if self.job is not None:
            for event in self.job.events():
                self._handle(event)
            if not self.job.done():
                return True
            for event in self.job.events():  # what arrived while it ended
                self._handle(event)
        self._finish()
        return False

    def _handle(self, event: dict) -> None:
        from .logic import VolumeResult

        if event["event"] == "case":
            index = self._file_index.get(event["case"])
            if index is not None:
                self._case_index = index
                self._progress(index, f"segmenting {self.nodes[index].GetName()}")
        elif event["event"] == "finished":
            index = self._file_index[event["case"]]
            node = self.nodes[index]
            if event["status"] != "ok":
                self._slots[index] = VolumeResult(node.GetName(), "failed", seconds=event.get("seconds"),
                                                  error=event.get("error"))
                return
            try:
                self._slots[index] = self._load(node, event)
            except Exception as exc:  # a result that cannot be loaded fails its case only
                self._slots[index] = VolumeResult(node.GetName(), "failed", error=f"{exc.__class__.__name__}: {exc}")

    def _load(self, node, event):
        """Main thread: the worker's label map of one case into '<volume> MedLSAM'."""
        from .logic import RESULT_SUFFIX, VolumeResult
        from .nodes import place_under_study, write_labels_to_segmentation

        out = self.work_dir / "out"
        record = CaseRecord.from_json(json.loads((out / f"{event['case']}.json").read_text(encoding="utf-8")))
        labels = read_labels(out / record.outputs["labels"])
        if self._structures is None:
            from MedLSAMLib.templates import load_template

            first = load_template(self.settings.templates[0])
            self._structures = [first.structures[name] for name in record.structures]
        segmentation = self.core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node.GetName() + RESULT_SUFFIX)
        segmentation.CreateDefaultDisplayNodes()
        write_labels_to_segmentation(labels, self._structures, segmentation, node)
        place_under_study(self.core.scene, segmentation, node)
        return VolumeResult(node.GetName(), "ok", seconds=event.get("seconds"), segmentation=segmentation.GetID(),
                            volume_id=node.GetID(), structures=record.summaries())

    def _finish(self) -> None:
        from .logic import VolumeResult

        state, reason = self.job.outcome() if self.job is not None else ("done", None)
        for n, node in enumerate(self.nodes):
            if self._slots[n] is None:
                self._slots[n] = (VolumeResult(node.GetName(), "cancelled") if state == "cancelled" else
                                  VolumeResult(node.GetName(), "failed", error=reason or "not segmented"))
        self._done = True
        self._progress(len(self.nodes), "done")
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _progress(self, index: int, stage: str) -> None:
        if self.progress_callback:
            self.progress_callback(index, len(self.nodes), stage)
