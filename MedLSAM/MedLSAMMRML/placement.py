"""Building templates in Slicer: guided six-point placement, points from a segment, template sets.

Guided placement uses Slicer's predefined control points: a point-list node holds six points
named superior ... posterior whose positions start *undefined* (``UnsetNthControlPointPosition``;
``ResetNthControlPointPosition`` would leave a *preview* point, which Slicer's place mode fills
first: docs/slicer-behaviour.md). Place mode fills the first undefined point on each click, so
the user always places the point whose name the panel shows next. Re-placing a point makes it
undefined again. The node is the single source of truth: the panel only reads
:func:`placement_status`.

slicer + vtk only (no Qt), so slicer-core runs all of it in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import POINT_NAMES, extreme_point_problems, ras_to_lps
from MedLSAMLib.io import write_volume
from MedLSAMLib.templates import (Structure, Template, check_structure_name, default_color, extreme_points_from_mask,
                                  load_template, save_template)
from MedLSAMLib.terminology import terminology_for

from .nodes import (add_volume_node, geometry_from_ijk_to_ras, image_block, matrix_to_numpy, node_geometry,
                    oriented_image, segment_labelmap, segment_mask, set_markups_points, volume_from_node,
                    write_labels_to_segmentation)

STRUCTURE_ATTRIBUTE = "MedLSAM.Structure"  # node attribute: which structure a point list belongs to
LABEL_ATTRIBUTE = "MedLSAM.Label"
TEMPLATE_ATTRIBUTE = "MedLSAM.Template"  # on a volume node: the template folder it was saved to / loaded from
MASKS_ATTRIBUTE = "MedLSAM.TemplateMasksOf"  # on a segmentation node: the ID of the template volume it masks
LABELS_FILE = "labels.nii.gz"


@dataclass
class PlacementStatus:
    placed: list[str]
    next_point: str | None  # name of the point the next click places, None when all six are placed
    problems: list[str] = field(default_factory=list)  # consistency / inside-the-image messages

    @property
    def progress(self) -> str:
        return f"{len(self.placed)}/6 placed"

    @property
    def complete(self) -> bool:
        return self.next_point is None and not self.problems


def new_placement_node(scene, structure: str, label: int, color=None):
    """A point list with the six named points still to be placed, in placement order."""
    check_structure_name(structure)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", structure)
    node.CreateDefaultDisplayNodes()
    for name in POINT_NAMES:
        index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), name)
        node.UnsetNthControlPointPosition(index)
    node.SetFixedNumberOfControlPoints(True)  # clicks fill these six, never add a seventh
    node.SetAttribute(STRUCTURE_ATTRIBUTE, structure)
    node.SetAttribute(LABEL_ATTRIBUTE, str(int(label)))
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*(color or default_color(label)))
    return node


def _defined_points_lps(node) -> dict[str, np.ndarray]:
    out = {}
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        name = node.GetNthControlPointLabel(i).strip().lower()
        if name in POINT_NAMES:
            ras = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, ras)
            out[name] = ras_to_lps(ras)
    return out


def placement_status(node, volume_node=None) -> PlacementStatus:
    """Which points are placed, which comes next, and what is wrong with them so far."""
    points = _defined_points_lps(node)
    undefined = [node.GetNthControlPointLabel(i).strip().lower() for i in range(node.GetNumberOfControlPoints())
                 if node.GetNthControlPointPositionStatus(i) != node.PositionDefined]
    placed = [n for n in POINT_NAMES if n in points]
    problems = extreme_point_problems(points)
    if volume_node is not None and points:
        geometry = node_geometry(volume_node)
        for name, p in points.items():
            if not geometry.contains_lps(np.asarray(p)[None], tolerance=0.5)[0]:
                problems.append(f"{name} point lies outside {volume_node.GetName()}")
    return PlacementStatus(placed, undefined[0] if undefined else None, problems)


def replace_point(node, name: str) -> None:
    """Make ``name`` undefined so that the next click places it again."""
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointLabel(i).strip().lower() == name:
            node.UnsetNthControlPointPosition(i)
            return
    raise InputError(f"{node.GetName()}: no point named {name!r}")


def points_from_segment(segmentation_node, segment_id: str) -> np.ndarray:
    """The six LPS extreme points of a segment (each on a voxel of the segment)."""
    image, value = segment_labelmap(segmentation_node, segment_id)
    if image is None:
        raise InputError(f"segment {segment_id!r} has no binary labelmap")
    block, (i0, j0, k0) = image_block(image)
    if not block.size:
        raise InputError(f"segment {segment_id!r} is empty")
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    ijk_to_ras = matrix_to_numpy(m)
    # the extent may start anywhere: shift the origin so array index 0 is extent start
    ijk_to_ras[:3, 3] = (ijk_to_ras @ np.array([i0, j0, k0, 1.0]))[:3]
    return extreme_points_from_mask(block == value, geometry_from_ijk_to_ras(ijk_to_ras, block.shape[::-1]))


def fill_placement_node(node, points_lps) -> None:
    """Set all six points (e.g. from a segment) keeping the node's guided-placement set-up."""
    node.SetFixedNumberOfControlPoints(False)
    set_markups_points(node, points_lps)
    node.SetFixedNumberOfControlPoints(True)


def template_masks_node(scene, volume_node, create: bool = False):
    """The segmentation holding the masks proposed (and perhaps corrected) for a template volume."""
    for node in scene.GetNodesByClass("vtkMRMLSegmentationNode"):
        if node.GetAttribute(MASKS_ATTRIBUTE) == volume_node.GetID():
            return node
    if not create:
        return None
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} template masks")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetAttribute(MASKS_ATTRIBUTE, volume_node.GetID())
    return node


def propose_masks(volume_node, placement_nodes, settings=None):
    """For every structure whose six points are placed: the mask MedLSAM makes from them on the
    template volume (``MedLSAMLib.point_masks``), as a segment named after the structure in the
    volume's template-masks segmentation, replacing an earlier proposal. The clinician may correct
    it with the Segment Editor; :func:`save_template_set` stores it as the template's label map.
    Returns (segmentation node, names proposed)."""
    from MedLSAMLib.point_masks import mask_from_points, mask_on_image

    volume = volume_from_node(volume_node)
    structures = []
    for node in placement_nodes:
        status = placement_status(node, volume_node)
        if status.complete:
            name = node.GetAttribute(STRUCTURE_ATTRIBUTE) or node.GetName()
            display = node.GetDisplayNode()
            color = tuple(display.GetSelectedColor()) if display is not None else default_color(1)
            points = _defined_points_lps(node)
            structures.append((name, np.array([points[n] for n in POINT_NAMES]), color))
    if not structures:
        raise InputError("place all six points of a structure first")
    segmentation_node = template_masks_node(volume_node.GetScene(), volume_node, create=True)
    segmentation = segmentation_node.GetSegmentation()
    for name, points, color in structures:
        mask = mask_on_image(*mask_from_points(volume, points, settings), volume.geometry)
        old = segmentation.GetSegmentIdBySegmentName(name)
        if old:
            segmentation.RemoveSegment(old)
        segment_id = segmentation.AddEmptySegment(name, name, list(color))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            oriented_image(mask, volume.geometry), segmentation_node, segment_id,
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        if not ok:
            raise RuntimeError(f"could not write the proposed mask of {name}")
    return segmentation_node, [name for name, _, _ in structures]


def save_template_set(volume_node, placement_nodes, directory) -> Path:
    """Write the volume and the structures' points as a template folder (the CLI's format); when
    the volume has template masks (:func:`propose_masks`, perhaps corrected), also ``labels.nii.gz``
    holding each structure's segment under its label value (structures without a segment keep
    their six points only and get a mask made at run time).

    The image is written beside ``template.json`` so the folder moves as one.
    """
    structures = {}
    for node in placement_nodes:
        name = node.GetAttribute(STRUCTURE_ATTRIBUTE) or node.GetName()
        status = placement_status(node, volume_node)
        if status.next_point is not None:
            raise InputError(f"{name}: {status.progress}; place the {status.next_point} point first")
        if status.problems:
            raise InputError(f"{name}: {status.problems[0]}")
        points = _defined_points_lps(node)
        display = node.GetDisplayNode()
        color = tuple(display.GetSelectedColor()) if display is not None else None
        label = int(node.GetAttribute(LABEL_ATTRIBUTE) or len(structures) + 1)
        structures[name] = Structure(name, label, np.array([points[n] for n in POINT_NAMES]),
                                     color or default_color(label), terminology=terminology_for(name))
    if not structures:
        raise InputError("add at least one structure to the template")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image_path = directory / "image.nrrd"
    volume = volume_from_node(volume_node)
    write_volume(volume, image_path)
    labels_path = _write_template_labels(volume_node, volume, structures, directory / LABELS_FILE)
    save_template(Template(image_path, structures, labels_path=labels_path), directory)
    volume_node.SetAttribute(TEMPLATE_ATTRIBUTE, str(directory))
    return directory


def _write_template_labels(volume_node, volume, structures: dict, path: Path):
    """The template-masks segments of the structures as one label map on the volume's grid (None
    when there are none; a stale label map from an earlier save is removed)."""
    masks = template_masks_node(volume_node.GetScene(), volume_node)
    labels = np.zeros(volume.geometry.shape_kji, np.uint16)
    for name, s in structures.items():
        if masks is not None and masks.GetSegmentation().GetSegmentIdBySegmentName(name):
            labels[segment_mask(masks, name, volume.geometry)] = s.label
    if not labels.any():
        path.unlink(missing_ok=True)
        return None
    write_volume(volume.with_array(labels.astype(np.uint8) if labels.max() < 256 else labels, "labels"), path)
    return path


def template_from_segmentation(volume_node, segmentation_node, directory, labels: dict | None = None) -> Path:
    """A reviewed case becomes a template: the volume, each non-empty segment's six extreme points,
    and the segments as the template's label map (names and colours kept; label values from
    ``labels`` {name: value}, else 1, 2, ... in segment order). The folder is the CLI's format."""
    volume = volume_from_node(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    label_map = np.zeros(volume.geometry.shape_kji, np.uint16)
    structures = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        name = check_structure_name(segment.GetName())
        mask = segment_mask(segmentation_node, name, volume.geometry)
        if not mask.any():
            continue  # an empty segment (a structure the case lacks) is not a template structure
        value = int((labels or {}).get(name, n + 1))
        label_map[mask] = value
        structures[name] = Structure(name, value, extreme_points_from_mask(mask, volume.geometry),
                                     tuple(segment.GetColor()), terminology=terminology_for(name))
    if not structures:
        raise InputError(f"{segmentation_node.GetName()}: no segment holds any voxel")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = directory / "image.nrrd", directory / LABELS_FILE
    write_volume(volume, image_path)
    write_volume(volume.with_array(label_map.astype(np.uint8) if label_map.max() < 256 else label_map, "labels"),
                 labels_path)
    save_template(Template(image_path, structures, labels_path=labels_path), directory)
    volume_node.SetAttribute(TEMPLATE_ATTRIBUTE, str(directory))
    return directory


def load_template_set(scene, directory):
    """Load a template folder into the scene: (volume node, [point-list node per structure])."""
    from MedLSAMLib.io import read_ct

    template = load_template(directory)
    volume_node = add_volume_node(scene, read_ct(template.image_path), f"{template.name} template")
    volume_node.SetAttribute(TEMPLATE_ATTRIBUTE, str(directory))
    nodes = []
    for s in template.structures.values():
        node = new_placement_node(scene, s.name, s.label, s.color)
        fill_placement_node(node, s.points)
        nodes.append(node)
    labels = template.load_labels()
    if labels is not None:  # its masks come back for review, as they were saved
        write_labels_to_segmentation(labels, template.structures.values(),
                                     template_masks_node(scene, volume_node, create=True), volume_node)
    return volume_node, nodes
