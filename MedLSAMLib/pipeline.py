"""The main job: localize and segment template structures in every CT of a cohort.

Per case, in OUTDIR: ``<case>.seg.nrrd`` (Slicer segmentation), ``<case>_labels.nii.gz`` (label
map) and ``<case>.json`` (boxes, confidences, timings, models). Each file is written atomically
and the JSON last, so a case is complete exactly when its JSON says ``"status": "ok"`` and the
other two files exist; ``resume`` skips such cases. A failing case is recorded in
``OUTDIR/summary.json`` with its error and the batch goes on. One batch writes into a folder at a
time (:func:`output_lock`); a second one pointed at the same folder is refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import traceback
from pathlib import Path

import numpy as np

from . import __version__
from .errors import USER_ERRORS, InputError
from .io import (Volume, case_name, read_ct, remove_stale_temporaries, write_segmentation, write_text_atomic,
                 write_volume)
from .preprocess import SAM_WINDOW
from .results import BatchSummary, CaseRecord, CaseResult, Segmented, json_text
from .segment.slices import SegmentOptions, StructureRequest, segment_volume


def output_paths(out_dir: Path, case: str) -> dict[str, Path]:
    return {"seg": out_dir / f"{case}.seg.nrrd", "labels": out_dir / f"{case}_labels.nii.gz",
            "json": out_dir / f"{case}.json"}


def _complete_record(out_dir: Path, case: str) -> dict | None:
    """The case's record if all its outputs exist and the record says ``ok`` (it is written last)."""
    paths = output_paths(out_dir, case)
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        record = json.loads(paths["json"].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "ok" else None


def is_complete(out_dir: Path, case: str) -> bool:
    return _complete_record(Path(out_dir), case) is not None


def resumed_result(out_dir: Path, path: Path) -> CaseResult | None:
    """A finished case's result as its own record gives it (for ``--resume``), or None if not finished."""
    case = case_name(path)
    record = _complete_record(Path(out_dir), case)
    if record is None:
        return None
    try:
        structures = CaseRecord.from_json(record).summaries()
    except (KeyError, TypeError, ValueError):  # a damaged record: the case is redone
        return None
    return CaseResult(case, str(path), "ok", float(record.get("timing_s", {}).get("total", 0.0)),
                      structures=structures, resumed=True)


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """Hold the output folder for one batch: a second batch pointed at it fails at once with a
    one-line error instead of both writing the same cases. An advisory lock on the folder itself
    (nothing is created in it); the system drops it when the process ends, even on SIGKILL, so a
    killed batch never leaves a stale lock. Once held, the temporaries of a writer killed
    mid-write are removed. No lock where the platform has no ``flock`` (Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"{out_dir}: another medlsam batch is writing into this folder; wait for it to "
                             "finish or choose another --out") from None
        remove_stale_temporaries(out_dir)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class CohortSegmenter:
    """Templates, localizer and segmenter loaded once; ``segment_case`` per CT.

    ``localizer``: any of :mod:`MedLSAMLib.localizers` (built with ``LocalizerSpec.build``)."""

    def __init__(self, localizer, segmenter, options: SegmentOptions | None = None):
        self.localizer = localizer
        self.segmenter = segmenter
        self.options = options or SegmentOptions()
        first = localizer.templates[0]
        self.structures = {name: first.structures[name] for name in localizer.structures}

    def segment_volume(self, volume: Volume, progress=None) -> tuple[np.ndarray, CaseRecord]:
        """Label map and the case record (no files written)."""
        t0 = time.perf_counter()
        want_priors = self.options.prior_weight > 0 and getattr(self.localizer, "gives_priors", False)
        loc = self.localizer.localize(volume, priors=True) if want_priors else self.localizer.localize(volume)
        t_loc = time.perf_counter() - t0
        requests = []
        for name, r in loc.structures.items():
            if r.present:
                s = self.structures[name]
                requests.append(StructureRequest(name, s.label, r.prompt_boxes(self.options.prompt),
                                                 s.window or SAM_WINDOW, loc.priors.get(name)))
        labels, stats, timing = segment_volume(volume, requests, self.segmenter, self.options, progress)
        structures = {name: r.with_segmentation(Segmented(**stats.get(name, {"voxels": 0})))
                      for name, r in loc.structures.items()}
        record = CaseRecord(
            image=loc.image, mode=loc.mode, structures=structures,
            timing_s={"localize": round(t_loc, 3), **{k: round(v, 3) for k, v in timing.items()},
                      "total": round(time.perf_counter() - t0, 3)},
            models={"localizer": loc.localizer, **({"medlam": loc.checkpoint} if loc.checkpoint else {}),
                    "segmenter": self.segmenter.describe()},
            medlsam_version=__version__, python=platform.python_version())
        return labels, record

    def segment_case(self, image_path: Path, out_dir: Path, progress=None) -> CaseResult:
        case = case_name(image_path)
        t0 = time.perf_counter()
        volume = read_ct(image_path)
        t_read = time.perf_counter()
        labels, record = self.segment_volume(volume, progress)
        paths = output_paths(out_dir, case)
        label_volume = volume.with_array(labels)  # uint8 unless a label exceeds 255 (segment_volume)
        t_write = time.perf_counter()
        write_volume(label_volume, paths["labels"])
        write_segmentation(label_volume, [{"name": s.name, "label": s.label, "color": s.color,
                                           "terminology": s.terminology} for s in self.structures.values()],
                           paths["seg"])
        record.timing_s["write"] = round(time.perf_counter() - t_write, 3)
        record.timing_s["read"] = round(t_read - t0, 3)
        record.timing_s["total"] = round(time.perf_counter() - t0, 3)  # read + localize + segment + write
        record.case, record.status, record.outputs = case, "ok", {k: p.name for k, p in paths.items()}
        write_text_atomic(paths["json"], json_text(record.to_json()))  # last: marks the case complete
        return CaseResult(case, str(image_path), "ok", time.perf_counter() - t0, structures=record.summaries())


def list_cohort(images=None, images_dir=None) -> list[Path]:
    from .io import VOLUME_SUFFIXES

    paths = [Path(p) for p in images or []]
    if images_dir:
        d = Path(images_dir)
        if not d.is_dir():
            raise InputError(f"{d}: no such folder")
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES):
                paths.append(p)
    if not paths and images_dir:
        raise InputError(f"{images_dir}: no CT files in this folder (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, "
                         "or one DICOM series per sub-folder)")
    if not paths:
        raise InputError("no input images: give --image or --images-dir")
    names = [case_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"two inputs share the case name {dupes[0]!r}; outputs would overwrite each other")
    return paths


def segment_one(cohort: CohortSegmenter, path: Path, out_dir: Path, progress=None) -> CaseResult:
    """One case with the batch's error policy: a failure becomes a ``failed`` result, never an exception."""
    case = case_name(path)
    t0 = time.perf_counter()
    try:
        return cohort.segment_case(path, out_dir, progress)
    except USER_ERRORS as exc:
        return CaseResult(case, str(path), "failed", time.perf_counter() - t0, str(exc))
    except MemoryError:
        return CaseResult(case, str(path), "failed", time.perf_counter() - t0, "out of memory")
    except Exception as exc:  # keep the batch going; the trace goes to the summary
        return CaseResult(case, str(path), "failed", time.perf_counter() - t0,
                          f"{exc.__class__.__name__}: {exc}", traceback=traceback.format_exc(limit=5))


def prepare_out_dir(out_dir) -> Path:
    """The output folder, created if needed; a one-line error if the path is a file or another batch
    is writing into it (checked here too so that the CLI fails before loading any model)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: --out must be a folder, and this is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    with output_lock(out_dir):
        pass
    return out_dir


def write_summary(out_dir: Path, template_dirs, results: list[CaseResult], **extra) -> BatchSummary:
    summary = BatchSummary(__version__, [str(t) for t in template_dirs], list(results), extra)
    write_text_atomic(Path(out_dir) / "summary.json", json_text(summary.to_json()))
    return summary


def run_cohort(cohort: CohortSegmenter, images: list[Path], out_dir: Path, resume: bool = False,
               show_progress: bool = True, events=None) -> BatchSummary:
    """Segment every image in this process; never stop on one failure. Returns (and writes) the summary.

    ``events``: called with a dict per step (``{"event": "case", "index", "case"}``, ``{"event":
    "slices", "done", "total"}``, ``{"event": "finished", "index", "case", "status", "error",
    "seconds"}``): how MedLSAMLib.worker reports to the Slicer module."""
    from tqdm import tqdm

    emit = events or (lambda event: None)
    out_dir = prepare_out_dir(out_dir)
    results: list[CaseResult] = []
    with output_lock(out_dir):
        bar = tqdm(images, desc="cases", unit="case", disable=not show_progress, dynamic_ncols=True)
        for index, path in enumerate(bar):
            case = case_name(path)
            bar.set_postfix_str(case)
            emit({"event": "case", "index": index, "case": case})
            earlier = resumed_result(out_dir, path) if resume else None
            if earlier is None:
                slice_bar = []  # made at the first slice: a case whose masks all come from priors encodes none

                def progress(done, total, _bars=slice_bar, _case=case):
                    emit({"event": "slices", "done": done, "total": total})
                    if not total:  # nothing to encode (every structure has a prior): no bar
                        return
                    if not _bars:
                        _bars.append(tqdm(total=total, desc=f"  {_case} slices", unit="slice", leave=False,
                                          disable=not show_progress))
                    _bars[0].total, _bars[0].n = total, done
                    _bars[0].refresh()

                try:
                    earlier = segment_one(cohort, path, out_dir, progress)
                finally:
                    for bar_ in slice_bar:
                        bar_.close()
            results.append(earlier)
            emit({"event": "finished", "index": index, "case": case, "status": earlier.status, "error": earlier.error,
                  "seconds": round(earlier.seconds, 2)})
        return write_summary(out_dir, [t.directory for t in cohort.localizer.templates], results, executor="local")
