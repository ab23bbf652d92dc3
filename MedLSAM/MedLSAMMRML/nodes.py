"""MRML nodes <-> MedLSAMLib objects. Imports slicer and vtk only (no Qt), so Slicer's own MRML
libraries (PyPI ``slicer-core``) run this code in tests exactly as the application does.

MRML works in RAS; MedLSAMLib in LPS. Every conversion goes through ``MedLSAMLib.geometry``.
Parent transforms are applied (linear only); input nodes are never modified.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import POINT_NAMES, Geometry, lps_to_ras, ras_to_lps
from MedLSAMLib.io import Volume, check_dicom_slices, check_nifti_complete
from MedLSAMLib.terminology import to_slicer_string

_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- vtk <-> numpy: the one place for these conversions --------------------------------------
def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def oriented_image(mask: np.ndarray, geometry: Geometry, lo=(0, 0, 0)):
    """A uint8 vtkOrientedImageData holding ``mask`` (``[k, j, i]``) on ``geometry``'s grid, its
    extent starting at voxel ``lo`` (ijk; a block of the grid) or at 0 (the whole grid)."""
    image = slicer.vtkOrientedImageData()
    k, j, i = mask.shape
    i0, j0, k0 = (int(v) for v in lo)
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(mask, np.uint8).ravel()
    image.GetPointData().GetScalars().Modified()
    image.SetImageToWorldMatrix(numpy_to_matrix(geometry.ijk_to_ras_matrix))
    return image


def image_block(image) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A vtkImageData's voxels as a ``[k, j, i]`` array (a view) and the ijk of its first voxel
    (extents need not start at 0); an empty extent gives an empty array."""
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    scalars = image.GetPointData().GetScalars()
    if i1 < i0 or scalars is None:
        return np.zeros((0, 0, 0), np.uint8), (i0, j0, k0)
    return numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), (i0, j0, k0)


def segment_labelmap(segmentation_node, segment_id: str):
    """The segment's binary labelmap (vtkOrientedImageData) and its label value, or (None, 0)."""
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image):
        return None, 0
    return image, segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()


# --- volumes ---------------------------------------------------------------------------------


def ijk_to_world_ras(volume_node) -> np.ndarray:
    """IJK -> world RAS, including a linear parent transform (a warp is refused)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = matrix_to_numpy(m)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{volume_node.GetName()}: under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = matrix_to_numpy(to_world) @ ijk_to_ras
    return ijk_to_ras


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, size) -> Geometry:
    lps = _RAS_LPS @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return Geometry(lps[:3, 3], spacing, lps[:3, :3] / spacing, tuple(int(s) for s in size))


def node_geometry(volume_node) -> Geometry:
    """The node's world geometry (LPS, parent transform applied) without copying its voxels."""
    return geometry_from_ijk_to_ras(ijk_to_world_ras(volume_node), volume_node.GetImageData().GetDimensions())


def volume_from_node(volume_node) -> Volume:
    """A copy of a scalar volume node as a MedLSAMLib Volume (world geometry, LPS)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError("the selected volume has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{volume_node.GetName()}: not a scalar volume")
    check_loaded_file(volume_node)
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).astype(np.float32)
    geometry = geometry_from_ijk_to_ras(ijk_to_world_ras(volume_node), dims)
    volume = Volume(array, geometry, volume_node.GetName())  # astype copied: the node is untouched
    volume.meta["path"] = volume_node.GetName()
    return volume


def check_loaded_file(volume_node) -> None:
    """Refuse a volume loaded from a NIfTI file whose data ends early (Slicer's reader, like ITK's,
    loads an interrupted copy without complaint, the missing part as zeros), or from a DICOM series
    that is not one regular stack (a missing slice, uneven spacing: checked on the files Slicer's
    DICOM database holds for the volume's instances, as ``medlsam`` checks a DICOM folder)."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)  # the application's DICOM database
    if uids and database is not None:
        files = [database.fileForInstance(uid) for uid in uids]
        if all(files):
            check_dicom_slices(files, f"{volume_node.GetName()} (DICOM)")
    storage = volume_node.GetStorageNode()
    path = storage.GetFileName() if storage is not None else None
    if path and path.lower().endswith((".nii", ".nii.gz")) and Path(path).is_file():
        try:
            check_nifti_complete(Path(path))
        except InputError as exc:
            raise InputError(f"{volume_node.GetName()}: loaded from {exc}") from None


def write_labels_to_segmentation(labels: Volume, structures, segmentation_node, reference_volume_node=None) -> None:
    """Replace the node's segments by one segment per structure (name, colour, mask from ``labels``).

    ``structures``: objects with ``name``, ``label``, ``color`` and optionally ``terminology``
    (MedLSAMLib template structures).
    """
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    if reference_volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    for s in structures:
        segment_id = segmentation.AddEmptySegment(s.name, s.name, list(s.color))
        if getattr(s, "terminology", None):
            segmentation.GetSegment(segment_id).SetTerminology(to_slicer_string(s.terminology))
        mask = labels.array == s.label
        if mask.any():
            image = oriented_image(mask, labels.geometry)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
            if not ok:
                raise RuntimeError(f"could not write segment {s.name}")


def segment_mask(segmentation_node, segment_name: str, geometry: Geometry) -> np.ndarray:
    """A segment's binary mask resampled-free on ``geometry`` (which must be the segment's grid)."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise InputError(f"no segment named {segment_name!r}")
    image, value = segment_labelmap(segmentation_node, segment_id)
    out = np.zeros(geometry.shape_kji, bool)
    block, (i0, j0, k0) = image_block(image) if image is not None else (np.zeros((0, 0, 0)), (0, 0, 0))
    if not block.size:
        return out
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    if not np.allclose(matrix_to_numpy(m), geometry.ijk_to_ras_matrix, atol=1e-4):
        raise InputError(f"segment {segment_name} is not on the requested grid")
    k, j, i = block.shape
    out[k0:k0 + k, j0:j0 + j, i0:i0 + i] = block == value
    return out


def points_from_markups_node(markups_node) -> np.ndarray:
    """The six named control points of a point-list node, as (6, 3) LPS in POINT_NAMES order."""
    found = {}
    for i in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(i) != markups_node.PositionDefined:
            continue  # a point still to be placed
        label = markups_node.GetNthControlPointLabel(i).strip().lower()
        if label not in POINT_NAMES:
            raise InputError(f"{markups_node.GetName()}: unknown point name {label!r}")
        ras = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, ras)
        found[label] = ras_to_lps(ras)
    missing = [n for n in POINT_NAMES if n not in found]
    if missing:
        raise InputError(f"{markups_node.GetName()}: {len(found)}/6 placed; missing {', '.join(missing)}")
    return np.array([found[n] for n in POINT_NAMES])


def set_markups_points(markups_node, points_lps) -> None:
    markups_node.RemoveAllControlPoints()
    for name, p in zip(POINT_NAMES, np.asarray(points_lps)):
        markups_node.AddControlPoint(vtk.vtkVector3d(*lps_to_ras(p)), name)


def place_under_study(scene, node, volume_node) -> None:
    """Put ``node`` in the subject hierarchy folder that holds ``volume_node``."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    node_item = sh.GetItemByDataNode(node)
    if volume_item and node_item:
        sh.SetItemParent(node_item, sh.GetItemParent(volume_item))


def add_volume_node(scene, volume: Volume, name: str | None = None):
    """A new scalar volume node holding a copy of ``volume`` (geometry converted to RAS)."""
    image = vtk.vtkImageData()
    image.SetDimensions(*volume.geometry.size)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = \
        np.ascontiguousarray(volume.array, dtype=np.float32).ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name or "volume")
    m = vtk.vtkMatrix4x4()
    ras = volume.geometry.ijk_to_ras_matrix
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, ras[r, c])
    node.SetIJKToRASMatrix(m)
    node.SetAndObserveImageData(image)
    # a node made with AddNewNodeByClass has no display node: without one Slicer shows it blank
    # (slicer.util.addVolumeFromArray does the same)
    node.CreateDefaultDisplayNodes()
    return node
