"""Headless MedLSAM logic on MRML nodes; the Slicer module's Logic class delegates here.

Everything heavy is MedLSAMLib (the same code as the ``medlsam`` command line). Models and
template support features are loaded once and reused for every volume.
"""
from __future__ import annotations

import time
import traceback

import slicer

from MedLSAMLib.errors import USER_ERRORS
from MedLSAMLib.localize import TemplateLocalizer
from MedLSAMLib.pipeline import CohortSegmenter

from .nodes import place_under_study, volume_from_node, write_labels_to_segmentation

RESULT_SUFFIX = " MedLSAM"


class MedLSAMCore:
    def __init__(self, scene):
        self.scene = scene
        self._localizers: dict[tuple, TemplateLocalizer] = {}
        self._segmenters: dict[tuple, object] = {}

    # -- cached heavy objects ---------------------------------------------------------------
    def localizer(self, template_dirs, mode="wpl", device="auto", checkpoint=None) -> TemplateLocalizer:
        key = (tuple(str(d) for d in template_dirs), mode, device, str(checkpoint))
        if key not in self._localizers:
            self._localizers[key] = TemplateLocalizer(template_dirs, mode=mode, checkpoint=checkpoint, device=device)
        return self._localizers[key]

    def segmenter(self, name="litemedsam", checkpoint=None, device="cpu"):
        key = (name, str(checkpoint), str(device))
        if key not in self._segmenters:
            from MedLSAMLib.segment.backends import load_segmenter

            self._segmenters[key] = load_segmenter(name, checkpoint, device)
        return self._segmenters[key]

    # -- operations -------------------------------------------------------------------------
    def localize(self, template_dirs, volume_node, mode="wpl", device="auto", checkpoint=None) -> dict:
        return self.localizer(template_dirs, mode, device, checkpoint).localize(volume_from_node(volume_node))

    def segment(self, volume_node, template_dirs, segmentation_node=None, mode="spl", device="auto",
                segmenter=None, progress=None):
        """Localize and segment one volume into ``segmentation_node`` (created as '<volume> MedLSAM')."""
        localizer = self.localizer(template_dirs, mode, device)
        seg = segmenter or self.segmenter(device=localizer.device)
        cohort = CohortSegmenter(localizer, seg)
        volume = volume_from_node(volume_node)  # one copy of the node's voxels
        labels, record = cohort.segment_volume(volume, progress)
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             volume_node.GetName() + RESULT_SUFFIX)
            segmentation_node.CreateDefaultDisplayNodes()
        write_labels_to_segmentation(volume.with_array(labels), cohort.structures.values(),
                                     segmentation_node, volume_node)
        place_under_study(self.scene, segmentation_node, volume_node)
        return segmentation_node, record

    def process_cohort(self, volume_nodes, template_dirs, mode="spl", device="auto", segmenter=None,
                       progress_callback=None, cancel_event=None) -> list[dict]:
        """Segment every volume; one failure does not stop the others; cancel keeps finished results.

        ``progress_callback(case_index, case_count, stage)`` is called between stages;
        ``cancel_event`` is anything with ``is_set()`` (e.g. ``threading.Event``).
        """
        results = []
        for n, node in enumerate(volume_nodes):
            if progress_callback:
                progress_callback(n, len(volume_nodes), f"segmenting {node.GetName()}")
            if cancel_event is not None and cancel_event.is_set():  # checked between cases
                results.append({"volume": node.GetName(), "status": "cancelled"})
                continue
            t0 = time.perf_counter()
            try:
                seg_node, record = self.segment(node, template_dirs, mode=mode, device=device, segmenter=segmenter)
                results.append({"volume": node.GetName(), "status": "ok", "segmentation": seg_node.GetID(),
                                "seconds": time.perf_counter() - t0, "structures": record["structures"]})
            except USER_ERRORS as exc:
                results.append({"volume": node.GetName(), "status": "failed", "error": str(exc)})
            except Exception as exc:  # keep going; the trace is kept for the results table
                results.append({"volume": node.GetName(), "status": "failed",
                                "error": f"{exc.__class__.__name__}: {exc}", "traceback": traceback.format_exc(limit=5)})
        if progress_callback:
            progress_callback(len(volume_nodes), len(volume_nodes), "done")
        return results
