"""Typed results of a run, and the one place that turns them into the files and back.

* :class:`StructureResult`: one structure in one CT, as the localizer found it and (once
  segmented) with its mask's size: an entry of ``boxes.json`` / ``<case>.json``.
* :class:`Localization`: one CT's localization, the ``boxes.json`` file.
* :class:`CaseRecord`: one segmented CT, the ``<case>.json`` file.
* :class:`StructureSummary`, :class:`CaseResult`, :class:`BatchSummary`: ``summary.json``.

Every class has ``to_json()`` (a dict for ``json.dumps(..., indent=1)``, keys in the order the
files have always had) and ``from_json()``. A file written by an earlier version reads back and
writes out byte for byte: ``from_json`` keeps the order of the keys it read
(``Testing/Data/formats-0.1.0`` holds files written before these classes existed).

Results are values: a layer that adds to another's result makes a new one
(:meth:`StructureResult.with_segmentation`), it never edits it in place.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace

#: Confidence under which a structure is flagged for review, everywhere (CLI tables, Slicer results,
#: summary.json). The hybrid localizer's confidence is the calibrated probability that its box is
#: right: below 0.5 the box is more likely wrong than right (docs/results.md, "Any field of view").
REVIEW_BELOW = 0.5


def json_text(doc: dict) -> str:
    """How every MedLSAM result file is written: ``json_text(result.to_json())``."""
    return json.dumps(doc, indent=1) + "\n"


def _ordered(values: dict, order: tuple) -> dict:
    """``values`` in an earlier file's layout: the keys of ``order`` first, in that order, and a
    key that file did not have left out while it is None (e.g. MedLAM's files before every
    structure entry carried ``slice_boxes_ijk``)."""
    if not order:
        return values
    head = {k: values[k] for k in order if k in values}
    return {**head, **{k: v for k, v in values.items() if k not in head and v is not None}}


def _drop_none(values: dict, *keys) -> dict:
    return {k: v for k, v in values.items() if not (k in keys and v is None)}


@dataclass(frozen=True)
class Segmented:
    """What segmentation made of one structure. ``slices`` and ``voxels_before_overlap`` are
    absent for a structure that was not segmented (reported absent by the localizer)."""

    voxels: int
    slices: int | None = None
    voxels_before_overlap: int | None = None  # before overlapping structures were resolved

    def to_json(self) -> dict:
        return _drop_none({"slices": self.slices, "voxels_before_overlap": self.voxels_before_overlap,
                           "voxels": self.voxels}, "slices", "voxels_before_overlap")


@dataclass(frozen=True)
class StructureSummary:
    """What a batch summary keeps of a structure; it carries the one review rule."""

    present: bool
    confidence: float
    voxels: int | None = None  # None: localized only, not segmented
    visible_fraction: float | None = None  # share of the structure the scan shows (hybrid localizer)
    key_order: tuple | None = field(default=None, repr=False, compare=False)  # of the file it was read from


    def needs_review(self) -> bool:
        """Absent, low confidence, or (once segmented) an empty mask."""
        return not self.present or self.confidence < REVIEW_BELOW or self.voxels == 0

    def to_json(self) -> dict:
        d = {"present": self.present, "confidence": self.confidence, "voxels": self.voxels or 0,
             "review": self.needs_review()}
        if self.visible_fraction is not None:
            d["visible_fraction"] = self.visible_fraction
        if self.key_order is not None:  # a file written before "review" existed reads back as it was
            d = {k: d[k] for k in self.key_order if k in d}
        return d

    @classmethod
    def from_json(cls, d: dict) -> StructureSummary:
        return cls(bool(d["present"]), float(d["confidence"]), int(d.get("voxels", 0)), d.get("visible_fraction"),
                   tuple(d))


#: The keys every localizer writes for a structure, in file order; a localizer's own evidence
#: (``match``, ``similarity``, ...) follows them, then ``note``, then the segmentation's counts.
_STRUCTURE_KEYS = ("label", "present", "confidence", "box_lps", "box_ijk", "sub_boxes_lps", "sub_boxes_ijk",
                   "extreme_points_lps", "slice_boxes_ijk")
_SEGMENTED_KEYS = ("slices", "voxels_before_overlap", "voxels")


@dataclass(frozen=True)
class StructureResult:
    """One structure in one CT. Boxes are ``[[min], [max]]``: LPS mm, or voxel indices
    (inclusive, i fastest); sub-boxes are SPL's parts (one box in WPL)."""

    label: int
    present: bool
    confidence: float  # 0-1; see the localizer's docs for what it multiplies
    box_lps: list
    box_ijk: list
    sub_boxes_lps: list
    sub_boxes_ijk: list
    extreme_points_lps: list  # (6, 3): superior, inferior, right, left, anterior, posterior
    slice_boxes_ijk: list | None = None  # one 2D box per axial slice, where the localizer mapped a shape
    evidence: dict = field(default_factory=dict)  # the localizer's own numbers (match, agreement, ...)
    note: str | None = None
    segmented: Segmented | None = None
    key_order: tuple = field(default=(), repr=False, compare=False)  # layout of the file it was read from

    def prompt_boxes(self, prompt: str) -> list:
        """The ijk boxes that prompt the segmenter: the per-slice boxes (``prompt="shape"``, where
        the localizer mapped a shape), else the (sub-)boxes."""
        if prompt == "shape" and self.slice_boxes_ijk:
            return self.slice_boxes_ijk
        return self.sub_boxes_ijk

    def with_segmentation(self, segmented: Segmented) -> StructureResult:
        return replace(self, segmented=segmented)

    def summary(self) -> StructureSummary:
        return StructureSummary(self.present, self.confidence, self.segmented.voxels if self.segmented else None,
                                self.evidence.get("visible_fraction"))

    def needs_review(self) -> bool:
        return self.summary().needs_review()

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in _STRUCTURE_KEYS}
        d.update(self.evidence)
        if self.note is not None:
            d["note"] = self.note
        if self.segmented is not None:
            d.update(self.segmented.to_json())
        return _ordered(d, self.key_order)

    @classmethod
    def from_json(cls, d: dict) -> StructureResult:
        known = set(_STRUCTURE_KEYS) | set(_SEGMENTED_KEYS) | {"note"}
        segmented = None
        if "voxels" in d:
            segmented = Segmented(int(d["voxels"]), d.get("slices"), d.get("voxels_before_overlap"))
        return cls(**{k: d.get(k) for k in _STRUCTURE_KEYS}, evidence={k: v for k, v in d.items() if k not in known},
                   note=d.get("note"), segmented=segmented, key_order=tuple(d))


def _structures_to_json(structures: dict) -> dict:
    return {name: s.to_json() for name, s in structures.items()}


def _structures_from_json(d: dict) -> dict[str, StructureResult]:
    return {name: StructureResult.from_json(s) for name, s in d.items()}


@dataclass
class Localization:
    """One CT's localization: the ``boxes.json`` file (``priors`` are arrays and never written)."""

    image: str
    mode: str
    templates: list
    localizer: dict  # the localizer's describe(): kind, settings, checkpoint
    device: str
    structures: dict  # name -> StructureResult
    timing_s: dict
    checkpoint: dict | None = None  # MedLAM's weights (path, sha256); also in ``localizer``
    stages: dict | None = None  # every stage's boxes (hybrid, keep_stages=True: benchmarks)
    priors: dict = field(default_factory=dict, repr=False, compare=False)  # name -> (offset_kji, probability)
    key_order: tuple = field(default=(), repr=False, compare=False)

    def to_json(self) -> dict:
        d = {"image": self.image, "mode": self.mode, "templates": self.templates, "checkpoint": self.checkpoint,
             "localizer": self.localizer, "device": self.device,
             "structures": _structures_to_json(self.structures), "stages": self.stages, "timing_s": self.timing_s}
        return _ordered(_drop_none(d, "checkpoint", "stages"), self.key_order)

    @classmethod
    def from_json(cls, d: dict) -> Localization:
        names = [f.name for f in fields(cls) if f.name not in ("structures", "priors", "key_order")]
        return cls(**{k: d.get(k) for k in names}, structures=_structures_from_json(d["structures"]),
                   key_order=tuple(d))


@dataclass
class CaseRecord:
    """One segmented CT: the ``<case>.json`` file. ``case``, ``status`` and ``outputs`` are set
    once the case's files are written (the Slicer logic keeps the record without files)."""

    image: str
    mode: str
    structures: dict  # name -> StructureResult, with ``segmented`` set
    timing_s: dict
    models: dict
    medlsam_version: str
    python: str
    case: str | None = None
    status: str | None = None
    outputs: dict | None = None
    key_order: tuple = field(default=(), repr=False, compare=False)

    def summaries(self) -> dict[str, StructureSummary]:
        return {name: s.summary() for name, s in self.structures.items()}

    def to_json(self) -> dict:
        d = {"image": self.image, "mode": self.mode, "structures": _structures_to_json(self.structures),
             "timing_s": self.timing_s, "models": self.models, "medlsam_version": self.medlsam_version,
             "python": self.python, "case": self.case, "status": self.status, "outputs": self.outputs}
        return _ordered(_drop_none(d, "case", "status", "outputs"), self.key_order)

    @classmethod
    def from_json(cls, d: dict) -> CaseRecord:
        names = [f.name for f in fields(cls) if f.name not in ("structures", "key_order")]
        return cls(**{k: d.get(k) for k in names}, structures=_structures_from_json(d.get("structures", {})),
                   key_order=tuple(d))


@dataclass
class CaseResult:
    """One case of a batch, as ``summary.json`` lists it."""

    case: str
    image: str
    status: str  # "ok" or "failed"
    seconds: float = 0.0
    error: str | None = None
    structures: dict = field(default_factory=dict)  # name -> StructureSummary
    traceback: str | None = None  # for unexpected errors only (bugs), not for user errors
    resumed: bool = False  # "ok" from an earlier run's complete outputs (``--resume``), not redone

    def to_json(self) -> dict:
        return {"case": self.case, "image": self.image, "status": self.status, "seconds": self.seconds,
                "error": self.error, "structures": {n: s.to_json() for n, s in self.structures.items()},
                "traceback": self.traceback, "resumed": self.resumed}

    @classmethod
    def from_json(cls, d: dict) -> CaseResult:
        return cls(d["case"], d["image"], d["status"], d.get("seconds", 0.0), d.get("error"),
                   {n: StructureSummary.from_json(s) for n, s in d.get("structures", {}).items()},
                   d.get("traceback"), bool(d.get("resumed", False)))


@dataclass
class BatchSummary:
    """A batch: the ``summary.json`` file. ``extra``: what the executor adds (``executor``, ...)."""

    medlsam_version: str
    templates: list
    cases: list  # CaseResult, in input order
    extra: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict:
        # "ok" counts every finished case, "resumed" those of them finished by an earlier run
        return {"ok": sum(r.status == "ok" for r in self.cases), "failed": sum(r.status == "failed" for r in self.cases),
                "resumed": sum(r.resumed for r in self.cases)}

    def to_json(self) -> dict:
        return {"medlsam_version": self.medlsam_version, "templates": self.templates, **self.extra,
                "cases": [r.to_json() for r in self.cases], "counts": self.counts}

    @classmethod
    def from_json(cls, d: dict) -> BatchSummary:
        extra = {k: v for k, v in d.items() if k not in ("medlsam_version", "templates", "cases", "counts")}
        return cls(d["medlsam_version"], d["templates"], [CaseResult.from_json(c) for c in d["cases"]], extra)
