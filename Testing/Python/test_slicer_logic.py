"""The Slicer module's MRML layer and headless logic on Slicer's real MRML libraries (slicer-core 5.13-dev,
outside the application). Not a Slicer self-test: those run only inside Slicer."""
import threading

import numpy as np
import pytest

from MedLSAMLib.geometry import Geometry
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.pipeline import CohortSegmenter, run_cohort
from MedLSAMLib.results import REVIEW_BELOW
from MedLSAMLib.localizers import LocalizerSpec
from MedLSAMLib.segment.slices import SegmentOptions
from MedLSAMLib.settings import RunSettings
from MedLSAMLib.templates import template_from_labels

from conftest import OBLIQUE, hn_case, phantom
from segmenters import SlowThresholdSegmenter, ThresholdSegmenter

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
import vtk  # noqa: E402

from MedLSAMMRML import nodes  # noqa: E402
from MedLSAMMRML.logic import MedLSAMCore  # noqa: E402


def test_volume_node_round_trip_with_oblique_grid_under_parent_transform(scene):
    geom = Geometry([-30.0, 12.5, 100.0], [0.9, 1.1, 2.0], OBLIQUE, (40, 30, 20))
    vol = phantom(geom, geom.ijk_to_lps([20, 15, 10]), 8.0)
    node = nodes.add_volume_node(scene, vol, "oblique")
    back = nodes.volume_from_node(node)
    assert back.geometry.is_close(geom, atol=1e-5) and np.array_equal(back.array, vol.array)

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 10.0)  # 10 mm towards patient left... in RAS: towards R
    m.SetElement(2, 3, -5.0)
    transform.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = nodes.volume_from_node(node)
    # RAS +10 x is LPS -10 x; RAS -5 z is LPS -5 z
    assert np.allclose(moved.geometry.origin, geom.origin + [-10.0, 0.0, -5.0], atol=1e-5)
    assert np.allclose(moved.geometry.direction, geom.direction, atol=1e-6)
    moved.array[:] = 0  # our copy; the node's image is untouched
    assert nodes.volume_from_node(node).array.max() == 300.0


def test_markups_node_round_trip(scene):
    pts = np.array([[0, 0, 50.0], [0, 0, 10.0], [-20, 0, 30.0], [20, 0, 30.0], [0, -15, 30.0], [0, 15, 30.0]])
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Brainstem")
    nodes.set_markups_points(node, pts)
    assert np.allclose(nodes.points_from_markups_node(node), pts)
    node.RemoveNthControlPoint(5)
    with pytest.raises(Exception, match="5/6 placed; missing posterior"):
        nodes.points_from_markups_node(node)


def test_process_cohort_matches_cli_outputs_and_cancel_keeps_finished(scene, tmp_path):
    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, [(7, "Mandible"), (1, "Brainstem")], tmp_path / "tpl")
    queries = [hn_case("validation-pats/pt_201")[0], hn_case("validation-pats/pt_202")[0]]
    volume_nodes = [nodes.add_volume_node(scene, read_ct(q), q.name.split(".")[0]) for q in queries]
    core = MedLSAMCore(scene)
    seen = []
    settings = RunSettings((tmp_path / "tpl",), LocalizerSpec(device="cpu"))
    results = core.process_cohort(volume_nodes, settings, segmenter=ThresholdSegmenter(),
                                  progress_callback=lambda i, n, s: seen.append((i, n)))
    assert [r.status for r in results] == ["ok", "ok"] and seen[-1] == (2, 2)

    # the same inputs through the command-line pipeline
    cli = run_cohort(CohortSegmenter(core.localizer(settings), ThresholdSegmenter()),
                     queries, tmp_path / "out", show_progress=False)
    assert cli.counts["ok"] == 2
    for node, q in zip(volume_nodes, queries):
        seg = scene.GetFirstNodeByName(node.GetName() + " MedLSAM")
        assert seg is not None
        written = read_labels(tmp_path / "out" / f"{q.name.split('.')[0]}_labels.nii.gz")
        for name, value in (("Mandible", 7), ("Brainstem", 1)):
            mask = nodes.segment_mask(seg, name, written.geometry)
            assert np.array_equal(mask, written.array == value), name
            assert mask.any()

    cancel = threading.Event()
    results = core.process_cohort(volume_nodes, settings, segmenter=ThresholdSegmenter(), cancel_event=cancel,
                                  progress_callback=lambda i, n, s: cancel.set() if i == 1 else None)
    assert [r.status for r in results] == ["ok", "cancelled"]


def test_cohort_run_polled_like_the_panel_keeps_mrml_on_the_main_thread_and_cancels_mid_case(scene, tmp_path):
    from MedLSAMMRML.logic import CohortRun

    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, [(7, "Mandible")], tmp_path / "tpl")
    queries = [hn_case(f"validation-pats/pt_{n}")[0] for n in (201, 202, 203)]
    volume_nodes = [nodes.add_volume_node(scene, read_ct(q), q.name.split(".")[0]) for q in queries]
    bad = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image")  # fails, the others go on
    core = MedLSAMCore(scene)
    writers = []
    original = core.write_result
    core.write_result = lambda *a, **k: writers.append(threading.current_thread()) or original(*a, **k)

    # SAM on every slice (no shape prior), so that the last case is cancelled between its slices
    settings = RunSettings((tmp_path / "tpl",), LocalizerSpec(device="cpu"),
                           options=SegmentOptions(prior_weight=0.0, slice_step=1))
    run = CohortRun(core, [volume_nodes[0], bad, volume_nodes[1], volume_nodes[2]], settings,
                    segmenter=SlowThresholdSegmenter(0.02))
    polls = 0
    while run.poll():
        polls += 1
        if len(run.results) == 3 and run.slices[0] > 0:  # the last case is part-way through its slices
            run.cancel()
        run.wait(0.02)
    assert polls > 10, "poll() returns at once while the worker computes"
    assert [r.status for r in run.results] == ["ok", "failed", "ok", "cancelled"]
    assert "no image data" in run.results[1].error
    assert writers and all(t is threading.main_thread() for t in writers)
    assert scene.GetFirstNodeByName("pt_203_ct MedLSAM") is None  # the cancelled case left nothing behind
    for r in run.results[::2]:
        assert set(r.structures) == {"Mandible"} and r.seconds > 0
        assert r.review == [n for n, st in r.structures.items() if not st.present or st.confidence < REVIEW_BELOW or not st.voxels]


def test_self_test_scenario_passes_on_real_mrml(scene, tmp_path):
    """The scenario MedLSAMTest runs inside Slicer, here on slicer-core with the fast test segmenter."""
    from medlsam_scenarios import build_template_and_cohort, check_cohort_results

    scenario = build_template_and_cohort(scene, tmp_path, cases=2)
    assert len(scenario["volumes"]) == 2 and scenario["structures"] == ["right lung", "left lung"]
    core = MedLSAMCore(scene)
    settings = RunSettings((scenario["template"],), LocalizerSpec(device="cpu"))
    results = core.process_cohort(scenario["volumes"], settings, segmenter=ThresholdSegmenter())
    assert check_cohort_results(scene, scenario, results, settings, segmenter=ThresholdSegmenter()) == []
    # the check can fail: a wrong mask is reported
    seg = scene.GetFirstNodeByName("case01 MedLSAM")
    seg.GetSegmentation().GetNthSegment(0).SetName("renamed")
    assert any("segments" in p for p in check_cohort_results(scene, scenario, results, settings,
                                                             segmenter=ThresholdSegmenter()))


def test_a_volume_loaded_from_a_truncated_nifti_fails_its_case_only(scene, tmp_path):
    """Slicer's reader (slicer-core's, here) loads an interrupted copy of a real CT without
    complaint, the missing part as zeros; the logic refuses that case and segments the others."""
    import SimpleITK as sitk

    source = hn_case("validation-pats/pt_201")[0]
    whole = tmp_path / "whole.nii"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(whole))
    cut = tmp_path / "cut_ct.nii"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    def load(path, name):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        node.SetAndObserveStorageNodeID(storage.GetID())
        assert storage.ReadData(node)
        return node

    cut_node, whole_node = load(cut, "cut"), load(whole, "whole")
    assert cut_node.GetImageData().GetDimensions() == (128, 128, 128)  # loaded, silently incomplete
    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, [(7, "Mandible")], tmp_path / "tpl")
    results = MedLSAMCore(scene).process_cohort([cut_node, whole_node],
                                                RunSettings((tmp_path / "tpl",), LocalizerSpec(device="cpu")),
                                                segmenter=ThresholdSegmenter())
    assert [r.status for r in results] == ["failed", "ok"]
    assert results[0].error.startswith(f"cut: loaded from {cut}: the image data ends early")


class _DicomDatabase:
    """Stand-in for Slicer's application DICOM database (``slicer.dicomDatabase``, which slicer-core
    does not have): only the one call the logic makes; anything else fails (no such attribute)."""

    __slots__ = ("_files",)

    def __init__(self, files_by_uid: dict):
        self._files = files_by_uid

    def fileForInstance(self, uid: str) -> str:  # noqa: N802  (ctkDICOMDatabase's name)
        return self._files.get(uid, "")


def test_a_volume_loaded_from_a_dicom_series_missing_a_slice_fails_its_case_only(scene, tmp_path, monkeypatch):
    """Slicer's DICOM module loads a series with a gap as one volume (with a warning); the logic
    checks the volume's own files, as the command line checks a DICOM folder."""
    import SimpleITK as sitk

    from test_io import write_dicom_series

    source = hn_case("validation-pats/pt_201")[0]
    image = sitk.Cast(sitk.ReadImage(str(source)), sitk.sitkInt16)
    nodes_by_series = {}
    files_by_uid = {}
    for name, skip in (("gap", {64}), ("whole", set())):
        folder = write_dicom_series(image, tmp_path / name, skip=skip)
        uids = []
        for f in sorted(folder.iterdir()):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(f))
            reader.ReadImageInformation()
            uid = reader.GetMetaData("0008|0018").strip()
            files_by_uid[uid] = str(f)
            uids.append(uid)
        node = nodes.add_volume_node(scene, read_ct(source), f"{name} series")  # the voxels Slicer would load
        node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))  # as Slicer's DICOM plugin marks them
        nodes_by_series[name] = node
    monkeypatch.setattr(slicer, "dicomDatabase", _DicomDatabase(files_by_uid), raising=False)
    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, [(7, "Mandible")], tmp_path / "tpl")
    results = MedLSAMCore(scene).process_cohort([nodes_by_series["gap"], nodes_by_series["whole"]],
                                                RunSettings((tmp_path / "tpl",), LocalizerSpec(device="cpu")),
                                                segmenter=ThresholdSegmenter())
    assert [r.status for r in results] == ["failed", "ok"]
    assert results[0].error.startswith("gap series (DICOM): DICOM series with a missing slice")
