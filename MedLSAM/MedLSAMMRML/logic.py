"""Headless MedLSAM logic on MRML nodes; the Slicer module's Logic class delegates here.

Everything heavy is MedLSAMLib (the same code as the ``medlsam`` command line). Models and
template support features are loaded once and reused for every volume.

Threading rule (Slicer's): MRML and Qt are touched only from the main thread. A cohort runs as a
:class:`CohortRun`: on the main thread it copies one volume out of MRML and later writes its
segmentation node; in between, the localization and segmentation of that copy run on a worker
thread. The panel drives ``poll()`` from a timer so the GUI stays responsive; scripts call
:meth:`MedLSAMCore.process_cohort`, which drives the same object to completion.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field

from MedLSAMLib.errors import USER_ERRORS, Cancelled
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.results import CaseRecord, Localization
from MedLSAMLib.settings import LazySegmenter, RunSettings, SegmenterChoice, SegmenterSpec

from .jobs import BackgroundJob
from .nodes import place_under_study, volume_from_node, write_labels_to_segmentation

RESULT_SUFFIX = " MedLSAM"


@dataclass
class VolumeResult:
    """One volume of a cohort run in Slicer (the panel's results table)."""

    volume: str  # the volume node's name
    status: str  # ok, failed or cancelled
    seconds: float | None = None
    segmentation: str | None = None  # ID of the segmentation node written
    volume_id: str | None = None  # ID of the volume node it segments
    structures: dict = field(default_factory=dict)  # name -> MedLSAMLib.results.StructureSummary
    error: str | None = None
    traceback: str | None = None  # unexpected errors only (bugs)

    @property
    def review(self) -> list[str]:
        """Structures to look at: :meth:`~MedLSAMLib.results.StructureSummary.needs_review`."""
        return [name for name, s in self.structures.items() if s.needs_review()]

    @property
    def review_text(self) -> str:
        """The results table's review cell: the structures to look at, each present one that the
        scan shows only in part with its share ("SpinalCord (40 % in scan)")."""
        def label(name):
            s = self.structures[name]
            partly = s.present and s.visible_fraction is not None and s.visible_fraction < 0.95
            return f"{name} ({100 * s.visible_fraction:.0f} % in scan)" if partly else name

        return ", ".join(label(n) for n in self.review)


class MedLSAMCore:
    def __init__(self, scene):
        self.scene = scene
        self._localizers: dict[tuple, object] = {}
        self._segmenters: dict[tuple, object] = {}

    # -- cached heavy objects (safe to build on the worker thread: no MRML) ------------------
    def localizer(self, settings: RunSettings):
        """The settings' ready localizer, kept between runs with the same templates and options."""
        key = (settings.templates, settings.localizer)
        if key not in self._localizers:
            self._localizers[key] = settings.build_localizer()
        return self._localizers[key]

    def segmenter(self, choice: SegmenterChoice = SegmenterSpec(), device="cpu"):
        """A segmenter (``RunSettings.segmenter``: a spec or a factory) on ``device``, kept between runs."""
        key = (choice, str(device))
        if key not in self._segmenters:  # loaded at its first use: carried masks need no model
            self._segmenters[key] = LazySegmenter(choice, device)
        return self._segmenters[key]

    def cohort_segmenter(self, settings: RunSettings, segmenter=None) -> CohortSegmenter:
        """``segmenter``: an already loaded one to use instead of the settings' (tests, the effect)."""
        localizer = self.localizer(settings)
        return CohortSegmenter(localizer, segmenter or self.segmenter(settings.segmenter, localizer.device), settings.options)

    # -- operations -------------------------------------------------------------------------
    def localize(self, settings: RunSettings, volume_node) -> Localization:
        return self.localizer(settings).localize(volume_from_node(volume_node))

    def write_result(self, volume_node, volume, labels, cohort: CohortSegmenter, segmentation_node=None):
        """Main thread: the labels into '<volume> MedLSAM' (or the given node), beside the volume."""
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             volume_node.GetName() + RESULT_SUFFIX)
            segmentation_node.CreateDefaultDisplayNodes()
        write_labels_to_segmentation(volume.with_array(labels), cohort.structures.values(),
                                     segmentation_node, volume_node)
        place_under_study(self.scene, segmentation_node, volume_node)
        return segmentation_node

    def segment(self, volume_node, settings: RunSettings, segmentation_node=None, segmenter=None,
                progress=None) -> tuple[object, CaseRecord]:
        """Localize and segment one volume into ``segmentation_node`` (created as '<volume> MedLSAM')."""
        cohort = self.cohort_segmenter(settings, segmenter)
        volume = volume_from_node(volume_node)  # one copy of the node's voxels
        labels, record = cohort.segment_volume(volume, progress)
        return self.write_result(volume_node, volume, labels, cohort, segmentation_node), record

    def process_cohort(self, volume_nodes, settings: RunSettings, segmenter=None, progress_callback=None,
                       cancel_event=None) -> list[VolumeResult]:
        """Segment every volume (blocking); one failure does not stop the others; cancel keeps finished results.

        ``progress_callback(case_index, case_count, stage)`` is called between stages;
        ``cancel_event`` is anything with ``is_set()`` (e.g. ``threading.Event``).
        """
        run = CohortRun(self, volume_nodes, settings, segmenter=segmenter, progress_callback=progress_callback,
                        cancel_event=cancel_event)
        while run.poll():
            run.wait(0.05)
        return run.results


class CohortRun:
    """One cohort, one case at a time; ``poll()`` from the main thread until it returns False.

    ``results``: one :class:`VolumeResult` per volume, in input order.
    """

    def __init__(self, core: MedLSAMCore, volume_nodes, settings: RunSettings, *, segmenter=None,
                 progress_callback=None, cancel_event=None):
        self.core = core
        self.nodes = list(volume_nodes)
        self.settings = settings
        self.segmenter = segmenter  # an already loaded segmenter to use instead of the settings' (tests)
        self.progress_callback = progress_callback
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self.results: list[VolumeResult] = []
        self._job = None  # the BackgroundJob of the running case
        self._case = None  # (node, volume copy, start time) of the running case
        self._cohort = None
        self._done = False

    @property
    def slices(self) -> tuple[int, int]:
        """Slices done / total of the running case."""
        return self._job.progress if self._job is not None else (0, 0)

    # -- main thread ------------------------------------------------------------------------
    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, seconds: float) -> None:
        """Block up to ``seconds`` for the running case (releases the GIL for the worker)."""
        if self._job is not None:
            self._job.wait(seconds)

    def poll(self) -> bool:
        if self._done:
            return False
        if self._job is not None:
            if not self._job.done():
                return True
            self._finish_case()
        index = len(self.results)
        if index == len(self.nodes):
            self._done = True
            self._progress(index, "done")
            return False
        node = self.nodes[index]
        if self.cancel_event.is_set():
            self.results.append(VolumeResult(node.GetName(), "cancelled"))
            return True
        self._progress(index, f"segmenting {node.GetName()}")
        try:
            volume = volume_from_node(node)  # MRML read: main thread
        except USER_ERRORS as exc:
            self.results.append(VolumeResult(node.GetName(), "failed", error=str(exc)))
            return True
        self._case = (node, volume, time.perf_counter())
        self._job = BackgroundJob(lambda report: self._compute(volume, report), self.cancel_event)
        return True

    def _finish_case(self) -> None:
        node, volume, t0 = self._case
        job, self._job, self._case = self._job, None, None
        entry = VolumeResult(node.GetName(), "ok", seconds=round(time.perf_counter() - t0, 1))
        try:
            labels, record = job.result()
            seg_node = self.core.write_result(node, volume, labels, self._cohort)  # MRML write: main thread
        except Cancelled:
            entry.status = "cancelled"
        except USER_ERRORS as exc:
            entry.status, entry.error = "failed", str(exc)
        except Exception as exc:  # keep going; the trace is kept for the results table
            entry.status, entry.error = "failed", f"{exc.__class__.__name__}: {exc}"
            entry.traceback = traceback.format_exc(limit=5)
        else:
            entry.segmentation, entry.structures = seg_node.GetID(), record.summaries()
            entry.volume_id = node.GetID()
        self.results.append(entry)

    def _progress(self, index: int, stage: str) -> None:
        if self.progress_callback:
            self.progress_callback(index, len(self.nodes), stage)

    # -- worker thread: no MRML, no Qt --------------------------------------------------------
    def _compute(self, volume, report):
        if self._cohort is None:
            self._cohort = self.core.cohort_segmenter(self.settings, self.segmenter)
        return self._cohort.segment_volume(volume, report)
