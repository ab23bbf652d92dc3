"""The Segment Editor effect's MRML-level work (ROI box, per-slice segmentation preview, write into a
segment), on Slicer's real MRML libraries (slicer-core 5.13-dev, outside the application)."""

import numpy as np
import pytest

from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import Geometry
from MedLSAMLib.io import read_ct

from conftest import OBLIQUE, hn_case, hn_template, phantom
from segmenters import ThresholdSegmenter

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
import vtk  # noqa: E402

from MedLSAMMRML import effect, nodes  # noqa: E402
from MedLSAMMRML.jobs import BackgroundJob  # noqa: E402
from MedLSAMMRML.logic import MedLSAMCore  # noqa: E402
from MedLSAMLib.localizers import LocalizerSpec  # noqa: E402
from MedLSAMLib.settings import RunSettings  # noqa: E402


@pytest.fixture
def oblique_volume(scene):
    geom = Geometry([-30.0, 12.5, 100.0], [0.9, 1.1, 2.0], OBLIQUE, (48, 40, 24))
    ball = phantom(geom, geom.ijk_to_lps([24, 20, 12]), 9.0)  # 300 inside, -1000 outside
    node = nodes.add_volume_node(scene, ball, "oblique")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 7.0)
    m.SetElement(1, 3, -3.0)
    transform.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def test_roi_round_trip_on_an_oblique_volume_under_a_transform(scene, oblique_volume):
    box = [[5, 7, 3], [30, 25, 17]]
    roi = effect.roi_from_ijk_box(scene, oblique_volume, box, "box")
    assert effect.ijk_box_from_roi(roi, oblique_volume) == box
    # the user drags the ROI 2 voxels along i: the box follows
    ijk_to_ras = nodes.ijk_to_world_ras(oblique_volume)
    shift = ijk_to_ras[:3, 0] * 2.0
    centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(centre)
    roi.SetCenterWorld(*(np.asarray(centre) + shift))
    assert effect.ijk_box_from_roi(roi, oblique_volume) == [[7, 7, 3], [32, 25, 17]]
    roi.SetCenterWorld(*(np.asarray(centre) + ijk_to_ras[:3, 0] * 500.0))
    with pytest.raises(InputError, match="outside"):
        effect.ijk_box_from_roi(roi, oblique_volume)


def test_segment_range_preview_and_apply_into_a_segment(scene, oblique_volume):
    box = [[10, 8, 4], [38, 32, 20]]
    image = effect.segment_box(oblique_volume, box, ThresholdSegmenter(), slices=(10, 13))
    centre_ras = nodes.ijk_to_world_ras(oblique_volume) @ [20, 20, 11.2, 1.0]
    assert effect.axial_slice_at(oblique_volume, centre_ras[:3]) == 11
    volume = nodes.volume_from_node(oblique_volume)
    assert volume.geometry.axial_axis == 2  # this phantom is stored axially: slices are k
    # ThresholdSegmenter keeps the bright pixels inside each slice's box; the ball's cross-sections
    # lie inside the box, so the preview is exactly the ball on slices 10-13 and nothing elsewhere
    expected = np.zeros(volume.array.shape, bool)
    expected[10:14] = volume.array[10:14] > 0
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    assert (k0, k1) == (10, 13) and (i0, j0) == (10, 8) and (i1, j1) == (38, 32)  # the segmented block only
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(oblique_volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Ball")
    block = np.zeros(volume.array.shape, bool)
    block[10:14, 8:33, 10:39] = True
    blank = np.zeros(volume.array.shape, bool)
    blank[2, 5:9, 5:9] = True  # the user's earlier work on another slice
    blank[11, 0:3, 0:3] = True  # a stray stroke inside the range but outside the box: kept too
    blank[12, 9, 11] = True  # inside the block, off the ball: replaced by the preview (cleared)
    effect.write_into_segment(nodes.oriented_image(blank, volume.geometry), segmentation, segment_id)
    effect.write_into_segment(effect.merged_with_segment(image, segmentation, segment_id, oblique_volume),
                              segmentation, segment_id)
    got = nodes.segment_mask(segmentation, "Ball", volume.geometry)
    assert expected.any() and np.array_equal(got, expected | (blank & ~block))
    assert effect.labelmap_voxel_count(image) == int(expected.sum())
    with pytest.raises(InputError, match="outside the box"):
        effect.segment_box(oblique_volume, box, ThresholdSegmenter(), slices=(30, 35))


def test_localize_box_roi_for_a_template_structure(scene, tmp_path):
    hn_template("train-pats/pt_1", [(7, "Mandible")], tmp_path / "tpl")
    node = nodes.add_volume_node(scene, read_ct(hn_case("validation-pats/pt_201")[0]), "pt_201")
    core = MedLSAMCore(scene)
    settings = RunSettings((tmp_path / "tpl",), LocalizerSpec(device="cpu"))
    roi, entry = effect.box_roi_for_structure(core, settings, node, "Mandible")
    assert roi.IsA("vtkMRMLMarkupsROINode") and entry.present
    lo, hi = (np.array(b) for b in effect.ijk_box_from_roi(roi, node))
    want_lo, want_hi = (np.array(b) for b in entry.box_ijk)
    assert np.all(np.abs(lo - want_lo) <= 1) and np.all(np.abs(hi - want_hi) <= 1)  # rounding at voxel faces
    with pytest.raises(InputError, match="no structure 'Liver'"):
        effect.box_roi_for_structure(core, settings, node, "Liver")


def test_background_job_gives_the_same_preview_and_cancels(scene, oblique_volume):
    import threading

    from MedLSAMLib.errors import Cancelled

    box = [[10, 8, 4], [38, 32, 20]]
    volume, request, lo, hi = effect.prepare_box(oblique_volume, box, slices=(6, 18))
    threads = []

    class Recording(ThresholdSegmenter):
        def embed(self, slices):
            threads.append(threading.current_thread())
            return super().embed(slices)

    job = BackgroundJob(lambda report: effect.run_box(volume, request, Recording(), report))
    while not job.done():
        threading.Event().wait(0.01)  # what the QTimer does between polls
    image = effect.preview_image(job.result(), volume, lo, hi)
    sync = effect.segment_box(oblique_volume, box, ThresholdSegmenter(), slices=(6, 18))
    from vtk.util import numpy_support

    assert image.GetExtent() == sync.GetExtent()
    assert np.array_equal(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()),
                          numpy_support.vtk_to_numpy(sync.GetPointData().GetScalars()))
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert job.progress[0] == job.progress[1] > 0

    gate = threading.Event()  # hold the job until Cancel is pressed, so the test has no race

    def held(report):
        gate.wait()
        return effect.run_box(volume, request, ThresholdSegmenter(), report)

    cancelled = BackgroundJob(held)
    cancelled.cancel()
    gate.set()
    with pytest.raises(Cancelled):
        cancelled.result()


def _finished(job):
    import threading

    while not job.done():
        threading.Event().wait(0.01)
    return job


def test_a_failing_worker_is_reported_in_one_line_and_never_raised_into_the_timer():
    def broken(report):
        raise FileNotFoundError("/templates/x/template.json: no such file\n(traceback follows)")

    job = BackgroundJob(broken)
    assert job.outcome()[0] in ("running", "failed")
    assert _finished(job).outcome() == ("failed", "/templates/x/template.json: no such file")
    assert _finished(BackgroundJob(lambda report: 1 / 0)).outcome() == ("failed", "division by zero")
    assert _finished(BackgroundJob(lambda report: "boxes")).outcome() == ("done", "boxes")


def test_a_job_that_never_reports_is_cancelled_and_its_late_result_discarded():
    """Localization never calls report(): Cancel (or leaving the effect) must still win, and the
    result arriving afterwards must not create a box."""
    import threading

    gate = threading.Event()

    def localize(report):  # like the effect's localize job: no report() calls
        gate.wait()
        return "a localization"

    job = BackgroundJob(localize)
    assert job.outcome() == ("running", None)
    job.cancel()
    gate.set()
    assert _finished(job).outcome() == ("cancelled", None)
