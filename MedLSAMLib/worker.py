"""``python -m MedLSAMLib.worker JOB.json``: one job in a process of its own, progress as JSON lines.

The Slicer module runs its long work here, not on a thread of Slicer's process: Slicer holds
Python's lock while its event loop runs, so a worker thread there gets it only while the main
thread runs Python (docs/slicer-behaviour.md). A process also isolates crashes (a failed case,
not a dead Slicer) and can be stopped at once. The same code as the command line runs.

A job file holds ``{"kind": ..., "settings": RunSettings.to_json(), ...}``:

* ``cohort``: ``"images"`` (files) and ``"out"`` (folder): ``medlsam segment``'s run, the same
  files per case (``<case>_labels.nii.gz``, ``<case>.json``, ``.seg.nrrd``) and ``summary.json``;
* ``localize``: ``"image"`` and ``"out"`` (a ``boxes.json``);
* ``box``: ``"segmenter"`` (a SegmenterSpec's fields), ``"device"``, ``"image"``, ``"request"``
  (``name``, ``label``, ``boxes_ijk``, ``window``) and ``"out"`` (a ``.npy`` label map): the
  Segment Editor effect's range of slices.

Each line on standard output is one JSON event: ``{"event": "case", ...}``, ``{"event":
"slices", "done", "total"}``, ``{"event": "finished", ...}`` (cohort), ``{"event": "done"}`` at
the end, or ``{"event": "error", "message"}`` and exit status 2. Nothing read from the job file
is executed; it names files and options only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import USER_ERRORS

EXIT_ERROR = 2


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def _slices(done: int, total: int) -> None:
    emit({"event": "slices", "done": int(done), "total": int(total)})


def run_job(job: dict) -> None:
    from .device import set_cpu_threads
    from .io import read_ct, write_text_atomic
    from .settings import RunSettings

    set_cpu_threads()
    kind = job.get("kind")
    settings = RunSettings.from_json(job["settings"]) if kind in ("cohort", "localize") else None
    if kind == "cohort":
        from .pipeline import run_cohort

        cohort = settings.build()
        run_cohort(cohort, [Path(p) for p in job["images"]], Path(job["out"]), show_progress=False, events=emit)
    elif kind == "localize":
        from .results import json_text

        localization = settings.build_localizer().localize(read_ct(job["image"]))
        write_text_atomic(job["out"], json_text(localization.to_json()))
    elif kind == "box":
        import numpy as np

        from .segment.slices import SegmentOptions, StructureRequest, segment_volume
        from .settings import SegmenterSpec

        from .device import resolve_device

        r = job["request"]
        request = StructureRequest(r["name"], int(r["label"]), r["boxes_ijk"], tuple(r["window"]))
        segmenter = SegmenterSpec(**job["segmenter"]).load(resolve_device(job.get("device", "auto")))
        labels, _, _ = segment_volume(read_ct(job["image"]), [request], segmenter,
                                      SegmentOptions(resolve_overlaps=False), _slices)
        out = Path(job["out"])
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, labels, allow_pickle=False)
        tmp.replace(out)
    else:
        raise ValueError(f"unknown job kind {kind!r}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m MedLSAMLib.worker JOB.json", file=sys.stderr)
        return EXIT_ERROR
    try:
        run_job(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    except USER_ERRORS as exc:
        emit({"event": "error", "message": str(exc)})
        return EXIT_ERROR
    except Exception as exc:  # a bug: the message for the user, the trace for the log
        import traceback

        traceback.print_exc()
        emit({"event": "error", "message": f"{exc.__class__.__name__}: {exc}"})
        return EXIT_ERROR
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
