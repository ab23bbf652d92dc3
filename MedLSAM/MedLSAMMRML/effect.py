"""What the MedLSAM Segment Editor effect does, on MRML nodes only (the effect file wires Qt to it).

1. Localize one template structure (:func:`structure_entry`) and show its box as a markups ROI
   aligned with the volume's voxel axes (:func:`roi_from_ijk_box`), which the user can drag.
2. :func:`ijk_box_from_roi` - read the (possibly edited) ROI back as a voxel box.
3. :func:`prepare_box` (main thread) -> :func:`run_box` (in a worker process, MedLSAMLib.worker) ->
   :func:`preview_image` (main thread): SAM-style segmentation of a range of slices inside that
   box, as a ``vtkOrientedImageData`` preview on the volume's grid; :func:`segment_box` chains the
   three for scripts.
4. :func:`merged_with_segment` - the selected segment with the preview's block replaced: what
   Apply writes (after ``saveStateForUndo``).

slicer + vtk only (no Qt), so slicer-core runs all of it in tests.
"""
from __future__ import annotations

import numpy as np
import slicer

from MedLSAMLib.errors import InputError
from MedLSAMLib.preprocess import SAM_WINDOW
from MedLSAMLib.results import Localization, StructureResult
from MedLSAMLib.segment.slices import SegmentOptions, StructureRequest, segment_volume

from .nodes import (ijk_to_world_ras, image_block, matrix_to_numpy, node_geometry, numpy_to_matrix, oriented_image,
                    segment_labelmap, volume_from_node)

PREVIEW_VALUE = 1


def roi_from_ijk_box(scene, volume_node, box_ijk, name: str):
    """A markups ROI covering the inclusive voxel box, its axes along the volume's voxel axes."""
    ijk_to_ras = ijk_to_world_ras(volume_node)
    lo, hi = np.asarray(box_ijk, float)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    axes = ijk_to_ras[:3, :3] / spacing
    centre_ras = (ijk_to_ras @ np.append((lo + hi) / 2.0, 1.0))[:3]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.CreateDefaultDisplayNodes()
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes  # oblique volumes get an oblique box
    object_to_node[:3, 3] = centre_ras
    roi.SetAndObserveObjectToNodeMatrix(numpy_to_matrix(object_to_node))
    roi.SetSize(*((hi - lo + 1.0) * spacing))  # whole voxels: the box's faces are voxel faces
    return roi


def ijk_box_from_roi(roi_node, volume_node) -> list[list[int]]:
    """The voxels whose centres lie in the ROI (axis-aligned hull in the volume's IJK), clipped."""
    corners_ras = []
    object_to_world = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    half = np.asarray(roi_node.GetSize()) / 2.0
    for sx in (-1, 1):
        for sy in (-1, 1):
            for sz in (-1, 1):
                corners_ras.append((object_to_world @ np.array([sx * half[0], sy * half[1], sz * half[2], 1.0]))[:3])
    ras_to_ijk = np.linalg.inv(ijk_to_world_ras(volume_node))
    ijk = np.array([(ras_to_ijk @ np.append(c, 1.0))[:3] for c in corners_ras])
    dims = np.array(volume_node.GetImageData().GetDimensions())
    lo = np.clip(np.ceil(ijk.min(0) - 1e-6), 0, dims - 1).astype(int)  # centres inside the faces
    hi = np.clip(np.floor(ijk.max(0) + 1e-6), 0, dims - 1).astype(int)
    if np.any(ijk.max(0) < 0) or np.any(ijk.min(0) > dims - 1):
        raise InputError(f"the box {roi_node.GetName()} lies outside {volume_node.GetName()}")
    return [lo.tolist(), hi.tolist()]


def structure_entry(localization: Localization, structure: str) -> StructureResult:
    """The localization's result for ``structure``, or a one-line error naming what the templates have."""
    if structure not in localization.structures:
        raise InputError(f"the templates have no structure {structure!r} "
                         f"(they have {', '.join(localization.structures)})")
    return localization.structures[structure]


def box_roi_for_structure(core, settings, volume_node, structure: str):
    """Localize ``structure`` with the settings' templates and localizer; (ROI node, its
    StructureResult). Blocking: the effect runs the localization in a worker process
    (MedLSAMMRML.process.ProcessJob) and then :func:`roi_from_ijk_box` instead."""
    entry = structure_entry(core.localize(settings, volume_node), structure)
    return roi_from_ijk_box(core.scene, volume_node, entry.box_ijk, f"{structure} box"), entry


def axial_slice_at(volume_node, ras) -> int:
    """Index along the volume's axial voxel axis of a world RAS point (e.g. the Red view's centre)."""
    ijk = (np.linalg.inv(ijk_to_world_ras(volume_node)) @ np.append(np.asarray(ras, float), 1.0))[:3]
    return int(round(ijk[axial_axis(volume_node)]))


def axial_axis(volume_node) -> int:
    """The voxel axis closest to head-foot (slices are taken across it)."""
    return node_geometry(volume_node).axial_axis


def prepare_box(volume_node, box_ijk, slices=None, window=SAM_WINDOW):
    """Main thread: copy the volume out of MRML and describe the block to segment.

    Returns ``(volume, request, lo, hi)``; ``slices`` = ``(first, last)`` along the axial axis.
    """
    volume = volume_from_node(volume_node)
    lo, hi = (np.array(b, int) for b in box_ijk)
    axial = volume.geometry.axial_axis  # voxel axis closest to head-foot
    if slices is not None:
        first, last = sorted(int(s) for s in slices)
        lo[axial], hi[axial] = max(lo[axial], first), min(hi[axial], last)
        if lo[axial] > hi[axial]:
            raise InputError(f"slices {first}-{last} are outside the box")
    request = StructureRequest("preview", PREVIEW_VALUE, [[lo.tolist(), hi.tolist()]], tuple(window))
    return volume, request, lo, hi


def request_json(request: StructureRequest) -> dict:
    """A box request as plain JSON (for MedLSAMLib.worker's ``box`` job)."""
    return {"name": request.name, "label": int(request.label), "boxes_ijk": [[list(map(int, lo)), list(map(int, hi))]
                                                                          for lo, hi in request.boxes_ijk],
            "window": [float(v) for v in request.window]}


def run_box(volume, request, segmenter, progress=None) -> np.ndarray:
    """Any thread (no MRML): the label map of the block (``[k, j, i]``, PREVIEW_VALUE inside)."""
    labels, _, _ = segment_volume(volume, [request], segmenter, SegmentOptions(resolve_overlaps=False), progress)
    return labels


def preview_image(labels, volume, lo, hi):
    """Main thread: the block of ``labels`` as a uint8 ``vtkOrientedImageData`` on the volume's grid,
    its extent the segmented block (the preview; see :func:`merged_with_segment` for Apply)."""
    block = labels[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] == PREVIEW_VALUE  # [k, j, i]
    return oriented_image(block, volume.geometry, lo)


def segment_box(volume_node, box_ijk, segmenter, slices=None, window=SAM_WINDOW, progress=None):
    """Blocking :func:`prepare_box` -> :func:`run_box` -> :func:`preview_image` (scripts, tests)."""
    volume, request, lo, hi = prepare_box(volume_node, box_ijk, slices, window)
    return preview_image(run_box(volume, request, segmenter, progress), volume, lo, hi)


def labelmap_voxel_count(image) -> int:
    return int(np.count_nonzero(image_block(image)[0]))


def merged_with_segment(preview, segmentation_node, segment_id: str, volume_node):
    """The segment on the volume's grid with the preview's block replaced by the preview.

    Apply writes this with ``ModificationModeSet``: the segmented slices take the preview, every
    other voxel of the segment (earlier slices, manual strokes) stays as it was.
    """
    volume = volume_from_node(volume_node)
    reference = oriented_image(np.zeros(volume.geometry.shape_kji, bool), volume.geometry)
    merged = np.zeros(volume.geometry.shape_kji, bool)
    current, value = segment_labelmap(segmentation_node, segment_id)
    if current is not None and current.GetExtent()[1] >= current.GetExtent()[0]:
        on_grid = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(current, reference, on_grid)
        _paste(merged, *image_block(on_grid), lambda block: block == value)
    _paste(merged, *image_block(preview), lambda block: block > 0)
    return oriented_image(merged, volume.geometry)


def _paste(target: np.ndarray, block: np.ndarray, lo, select) -> None:
    k, j, i = block.shape
    target[lo[2]:lo[2] + k, lo[1]:lo[1] + j, lo[0]:lo[0] + i] = select(block)


def write_into_segment(image, segmentation_node, segment_id: str) -> None:
    """Replace the segment by ``image``: the MRML primitive behind ``modifySelectedSegmentByLabelmap(
    image, ModificationModeSet)`` (Apply passes :func:`merged_with_segment`'s result)."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not write into segment {segment_id}")
