"""Our files read by Slicer's own MRML libraries (slicer-core 5.13-dev, outside the application)."""
import numpy as np
import pytest

from MedLSAMLib.geometry import lps_to_ras
from MedLSAMLib.io import Volume, write_segmentation
from MedLSAMLib.templates import load_template, template_from_labels

from conftest import OBLIQUE, hn_case, phantom

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
from vtk.util import numpy_support  # noqa: E402  (vtk comes with slicer-core)


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the segmentation converter rules, as the application does
    return scene, logic


def read_with_slicer(scene, node_class: str, storage_class: str, path):
    """A file read into a new node of ``scene`` by Slicer's own storage node, as File > Add Data does."""
    node = getattr(slicer, node_class)()
    scene.AddNode(node)
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    return node


def test_markups_written_by_medlsam_load_in_mrml(scene, tmp_path):
    scene, _ = scene
    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, [(1, "Brainstem")], tmp_path)
    points = load_template(tmp_path).structures["Brainstem"].points
    node = read_with_slicer(scene, "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsJsonStorageNode",
                            tmp_path / "Brainstem.mrk.json")
    assert [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())] == [
        "superior", "inferior", "right", "left", "anterior", "posterior"]
    for i in range(6):
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, ras)  # MRML holds RAS
        assert np.allclose(ras, lps_to_ras(points[i]), atol=1e-4)


def test_segmentation_written_by_medlsam_loads_in_mrml(scene, tmp_path):
    scene, logic = scene
    from MedLSAMLib.geometry import Geometry

    geom = Geometry([-30.0, 12.5, 100.0], [0.9, 1.1, 2.0], OBLIQUE, (40, 30, 20))
    ball = phantom(geom, geom.ijk_to_lps([20, 15, 10]), 8.0, inside=3, outside=0).array.astype(np.uint8)
    ball[2:5, 3:6, 4:8] = 7
    labels = Volume(ball, geom, "labels")
    write_segmentation(labels, [{"name": "Ball", "label": 3, "color": (0.9, 0.2, 0.1)},
                                {"name": "Block", "label": 7, "color": (0.1, 0.2, 0.9)}], tmp_path / "c.seg.nrrd")
    node = read_with_slicer(scene, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", tmp_path / "c.seg.nrrd")
    seg = node.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == ["Ball", "Block"]
    assert np.allclose(seg.GetNthSegment(0).GetColor(), (0.9, 0.2, 0.1), atol=1e-5)
    for n, value in ((0, 3), (1, 7)):
        image = slicer.vtkOrientedImageData()
        assert logic.GetSegmentBinaryLabelmapRepresentation(node, seg.GetNthSegmentID(n), image)
        import vtk

        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        assert np.allclose(ijk_to_ras, geom.ijk_to_ras_matrix, atol=1e-4)  # geometry identical, in RAS
        i0, i1, j0, j1, k0, k1 = image.GetExtent()
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        full = np.zeros_like(ball, dtype=bool)
        full[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = arr == seg.GetNthSegment(n).GetLabelValue()
        assert np.array_equal(full, ball == value)


def test_seg_nrrd_of_a_head_and_neck_template_carries_terminology_slicer_reads(scene, tmp_path):
    """Template from the shared head-and-neck labels -> `medlsam segment`'s .seg.nrrd -> read back
    with slicerio and with Slicer's own storage node: the standard codes survive."""
    import slicerio

    from MedLSAMLib.localizers.medlam import MedLAMLocalizer
    from MedLSAMLib.pipeline import CohortSegmenter
    from MedLSAMLib.terminology import to_slicer_string

    from segmenters import ThresholdSegmenter

    scene, _ = scene
    ct, labels = hn_case("train-pats/pt_1")
    template = template_from_labels(ct, labels, [(1, "Brainstem"), (3, "RightParotid"), (4, "LeftParotid")],
                                    tmp_path / "tpl")
    assert load_template(tmp_path / "tpl").structures["RightParotid"].terminology == template.structures[
        "RightParotid"].terminology  # kept in template.json
    cohort = CohortSegmenter(MedLAMLocalizer([tmp_path / "tpl"], mode="wpl", device="cpu"), ThresholdSegmenter())
    result = cohort.segment_case(hn_case("validation-pats/pt_201")[0], tmp_path / "out")
    path = tmp_path / "out" / f"{result.case}.seg.nrrd"

    by_slicerio = {s["name"]: s.get("terminology") for s in slicerio.read_segmentation(str(path))["segments"]}
    assert by_slicerio["RightParotid"]["type"] == ["SCT", "45289007", "Parotid gland"]
    assert by_slicerio["RightParotid"]["typeModifier"] == ["SCT", "24028007", "Right"]
    assert by_slicerio["LeftParotid"]["typeModifier"] == ["SCT", "7771000", "Left"]
    assert by_slicerio["Brainstem"]["type"] == ["SCT", "15926001", "Brainstem"]

    node = read_with_slicer(scene, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", path)
    seg = node.GetSegmentation()
    read = {seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i).GetTerminology()
            for i in range(seg.GetNumberOfSegments())}
    for name, s in template.structures.items():
        assert read[name] == to_slicer_string(s.terminology)
    assert "~SCT^45289007^Parotid gland~SCT^24028007^Right~" in read["RightParotid"]


def test_segments_written_into_mrml_carry_terminology(scene):
    from MedLSAMLib.geometry import Geometry
    from MedLSAMLib.templates import Structure
    from MedLSAMLib.terminology import terminology_for

    from MedLSAMMRML import nodes

    scene, _ = scene
    geom = Geometry([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], np.eye(3), (10, 10, 10))
    labels = Volume(np.zeros((10, 10, 10), np.uint8), geom, "labels")
    labels.array[3:6, 3:6, 3:6] = 1
    pts = np.array([[5, 5, 9.0], [5, 5, 1.0], [1, 5, 5.0], [9, 5, 5.0], [5, 1, 5.0], [5, 9, 5.0]])
    structures = [Structure("left lung", 1, pts, (0.5, 0.5, 0.9), terminology=terminology_for("left lung")),
                  Structure("Tumour", 2, pts, (0.9, 0.1, 0.1))]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    nodes.write_labels_to_segmentation(labels, structures, node)
    seg = node.GetSegmentation()
    lung = seg.GetSegment(seg.GetSegmentIdBySegmentName("left lung"))
    assert lung.GetTerminology().split("~")[2:4] == ["SCT^39607008^Lung", "SCT^7771000^Left"]
    # no code of ours: Slicer's default entry for a new segment
    assert seg.GetSegment(seg.GetSegmentIdBySegmentName("Tumour")).GetTerminology() == slicer.vtkSegment().GetTerminology()
