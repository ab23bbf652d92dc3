"""Template building in the Slicer module (guided placement, points from a segment, template sets),
on Slicer's real MRML libraries (slicer-core 5.13-dev, outside the application)."""

import numpy as np
import pytest

from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import POINT_NAMES, Geometry, lps_to_ras
from MedLSAMLib.io import Volume, read_ct, read_labels
from MedLSAMLib.templates import extreme_points_from_mask, load_template

from conftest import OBLIQUE, hn_case

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")

from MedLSAMMRML import nodes, placement  # noqa: E402


def _click(node, index, lps):
    """Set point ``index`` as a click would (the test names the point it expects to be filled)."""
    node.SetNthControlPointPositionWorld(index, *lps_to_ras(lps))


def place_click(node, lps) -> int:
    """One click in Slicer's place mode, as vtkSlicerMarkupsWidget::PlacePoint and
    vtkMRMLMarkupsDisplayNode::UpdateActiveControlPointWorld do it (docs/slicer-behaviour.md):
    the preview point if there is one; else, from the node's placement start index (0 when unset),
    the first undefined point (wrapping round); else a new point. Missing points are never
    chosen. Returns the index filled."""
    n = node.GetNumberOfControlPoints()
    statuses = [node.GetNthControlPointPositionStatus(i) for i in range(n)]
    if node.PositionPreview in statuses:
        index = statuses.index(node.PositionPreview)
    else:
        start = node.GetControlPointPlacementStartIndex()
        start = start if 0 <= start < n else 0
        order = [(start + d) % n for d in range(n)]
        index = next((i for i in order if statuses[i] == node.PositionUndefined), None)
        if index is None:
            raise AssertionError("no undefined point left: Slicer would add a seventh point")
    node.SetNthControlPointPositionWorld(index, *lps_to_ras(lps))
    return index


def statuses(node) -> list[str]:
    names = {node.PositionUndefined: "undefined", node.PositionPreview: "preview",
             node.PositionDefined: "defined", node.PositionMissing: "missing"}
    return [names[node.GetNthControlPointPositionStatus(i)] for i in range(node.GetNumberOfControlPoints())]


def test_each_click_fills_the_point_the_panel_names_also_after_a_replace(scene):
    node = placement.new_placement_node(scene, "Brainstem", 1)
    assert statuses(node) == ["undefined"] * 6  # no preview point at the origin, none placed first
    for expected in ("superior", "inferior"):
        named = placement.placement_status(node).next_point
        filled = node.GetNthControlPointLabel(place_click(node, [0.0, 0.0, 10.0 if expected == "superior" else 0.0]))
        assert named == filled == expected
    assert statuses(node) == ["defined"] * 2 + ["undefined"] * 4
    placement.replace_point(node, "superior")
    assert statuses(node) == ["undefined", "defined"] + ["undefined"] * 4
    named = placement.placement_status(node).next_point
    assert named == "superior" == node.GetNthControlPointLabel(place_click(node, [0.0, 0.0, 12.0]))
    for _ in range(4):
        named = placement.placement_status(node).next_point
        assert node.GetNthControlPointLabel(place_click(node, [1.0, 1.0, 5.0])) == named
    assert placement.placement_status(node).next_point is None and statuses(node) == ["defined"] * 6
    # re-placing a point of a complete node: the next click fills exactly that one
    placement.replace_point(node, "left")
    assert placement.placement_status(node).next_point == "left"
    assert node.GetNthControlPointLabel(place_click(node, [2.0, 1.0, 5.0])) == "left"


def test_guided_placement_shows_next_point_progress_and_problems(scene):
    geom = Geometry([-40.0, -40.0, 0.0], [1.0, 1.0, 2.0], OBLIQUE, (80, 80, 40))
    volume = nodes.add_volume_node(scene, Volume(np.zeros(geom.shape_kji, np.float32), geom), "ct")
    centre = geom.ijk_to_lps([40, 40, 20])
    node = placement.new_placement_node(scene, "Brainstem", 1)
    status = placement.placement_status(node, volume)
    assert (status.placed, status.next_point, status.progress) == ([], "superior", "0/6 placed")

    offsets = {"superior": [0, 0, 10], "inferior": [0, 0, -10], "right": [-8, 0, 0], "left": [8, 0, 0],
               "anterior": [0, -6, 0], "posterior": [0, 6, 0]}
    for n, name in enumerate(POINT_NAMES[:4]):
        _click(node, n, centre + offsets[name])
    status = placement.placement_status(node, volume)
    assert status.progress == "4/6 placed" and status.next_point == "anterior" and not status.problems

    # a superior point below the inferior one is reported at once, by name
    _click(node, 0, centre + [0, 0, -15])
    status = placement.placement_status(node, volume)
    assert status.problems == ["superior point is below the inferior point (head-foot axis: "
                               f"{centre[2] - 15:.1f} vs {centre[2] - 10:.1f} mm)"]
    placement.replace_point(node, "superior")
    assert placement.placement_status(node, volume).next_point == "superior"
    _click(node, 0, centre + offsets["superior"])
    _click(node, 4, centre + offsets["anterior"])
    _click(node, 5, centre + [0, 0, 500])  # far outside the volume
    status = placement.placement_status(node, volume)
    assert status.next_point is None and status.problems == ["posterior point lies outside ct"]
    assert not status.complete
    assert node.GetNumberOfControlPoints() == 6 and node.GetFixedNumberOfControlPoints()


def _case_in_scene(scene, case: str):
    """(CT, label map, the CT's volume node) of a data set case added to the scene."""
    ct, labels_path = hn_case(case)
    image = read_ct(ct)
    return image, read_labels(labels_path), nodes.add_volume_node(scene, image, case.split("/")[1])


def test_points_from_segment_are_the_masks_extreme_points(scene):
    image, labels, volume = _case_in_scene(scene, "train-pats/pt_1")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")

    class S:  # the template-structure shape write_labels_to_segmentation expects
        name, label, color = "Mandible", 7, (0.9, 0.8, 0.2)

    nodes.write_labels_to_segmentation(labels, [S], segmentation, volume)
    seg_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Mandible")
    got = placement.points_from_segment(segmentation, seg_id)
    expected = extreme_points_from_mask(labels.array == 7, labels.geometry)
    assert np.allclose(got, expected, atol=1e-3)

    node = placement.new_placement_node(scene, "Mandible", 7)
    placement.fill_placement_node(node, got)
    status = placement.placement_status(node, volume)
    assert status.complete and status.placed == list(POINT_NAMES)
    empty_id = segmentation.GetSegmentation().AddEmptySegment("Empty")
    with pytest.raises(InputError, match="empty"):
        placement.points_from_segment(segmentation, empty_id)


def test_template_set_saved_in_slicer_loads_in_the_library_and_back(scene, tmp_path):
    image, labels, volume = _case_in_scene(scene, "train-pats/pt_1")
    brainstem = placement.new_placement_node(scene, "Brainstem", 1)
    placement.fill_placement_node(brainstem, extreme_points_from_mask(labels.array == 1, labels.geometry))
    unfinished = placement.new_placement_node(scene, "Larynx", 6)
    with pytest.raises(InputError, match="Larynx: 0/6 placed; place the superior point first"):
        placement.save_template_set(volume, [brainstem, unfinished], tmp_path / "t")

    placement.save_template_set(volume, [brainstem], tmp_path / "t")
    template = load_template(tmp_path / "t")  # what `medlsam segment --template` reads
    assert list(template.structures) == ["Brainstem"] and template.structures["Brainstem"].label == 1
    assert np.allclose(template.structures["Brainstem"].points,
                       extreme_points_from_mask(labels.array == 1, labels.geometry), atol=1e-4)
    saved = template.load_image()
    assert saved.geometry.is_close(image.geometry, atol=1e-4) and np.array_equal(saved.array, image.array)

    volume2, point_lists = placement.load_template_set(scene, tmp_path / "t")
    assert [n.GetName() for n in point_lists] == ["Brainstem"]
    assert np.allclose(nodes.points_from_markups_node(point_lists[0]), template.structures["Brainstem"].points, atol=1e-4)
    assert nodes.volume_from_node(volume2).geometry.is_close(image.geometry, atol=1e-4)
    # a loaded template shows in the views: it has a scalar-volume display node with a colour map
    display = volume2.GetDisplayNode()
    assert display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode")


def test_saved_and_loaded_template_volumes_are_marked_so_the_cohort_skips_them(scene, tmp_path):
    ct, labels_path = hn_case("train-pats/pt_1")
    labels = read_labels(labels_path)
    volume = nodes.add_volume_node(scene, read_ct(ct), "pt_1")
    node = placement.new_placement_node(scene, "Brainstem", 1)
    placement.fill_placement_node(node, extreme_points_from_mask(labels.array == 1, labels.geometry))
    assert volume.GetAttribute(placement.TEMPLATE_ATTRIBUTE) is None
    placement.save_template_set(volume, [node], tmp_path / "t")
    assert volume.GetAttribute(placement.TEMPLATE_ATTRIBUTE) == str(tmp_path / "t")
    loaded, _ = placement.load_template_set(scene, tmp_path / "t")
    assert loaded.GetAttribute(placement.TEMPLATE_ATTRIBUTE) == str(tmp_path / "t")


def test_proposed_masks_can_be_corrected_and_are_saved_as_the_templates_label_map(scene, tmp_path):
    from MedLSAMLib.evaluate import dice
    from MedLSAMLib.localizers.hybrid import HybridLocalizer

    image, labels, volume = _case_in_scene(scene, "train-pats/pt_1")
    point_lists = []
    for value, name in ((1, "Brainstem"), (7, "Mandible")):
        node = placement.new_placement_node(scene, name, value)
        placement.fill_placement_node(node, extreme_points_from_mask(labels.array == value, labels.geometry))
        point_lists.append(node)
    unfinished = placement.new_placement_node(scene, "Larynx", 6)
    masks, proposed = placement.propose_masks(volume, point_lists + [unfinished])
    assert proposed == ["Brainstem", "Mandible"]  # only structures with their six points
    brainstem = nodes.segment_mask(masks, "Brainstem", image.geometry)
    mandible = nodes.segment_mask(masks, "Mandible", image.geometry)
    assert dice(brainstem, labels.array == 1) > 0.6 and dice(mandible, labels.array == 7) > 0.6
    assert placement.template_masks_node(scene, volume) is masks  # found again, not duplicated
    # the clinician corrects the mandible (here: replaces it by the clinical contour)
    segment_id = masks.GetSegmentation().GetSegmentIdBySegmentName("Mandible")
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        nodes.oriented_image(labels.array == 7, image.geometry), masks, segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    placement.save_template_set(volume, point_lists, tmp_path / "t")
    template = load_template(tmp_path / "t")
    saved = template.load_labels()
    assert saved is not None and saved.geometry.is_close(image.geometry, atol=1e-4)
    assert np.array_equal(saved.array == 7, labels.array == 7)  # the correction, voxel for voxel
    assert np.array_equal(saved.array == 1, brainstem)  # the proposal, as proposed
    prepared = HybridLocalizer([tmp_path / "t"], cache_dir=None).prepared[0].structures["Mandible"]
    assert prepared.from_mask and prepared.mask.sum() == (labels.array == 7).sum()  # the saved mask is used

    # loading the template brings the masks back for review
    scene.Clear()
    volume2, _ = placement.load_template_set(scene, tmp_path / "t")
    again = placement.template_masks_node(scene, volume2)
    assert again is not None
    assert np.array_equal(nodes.segment_mask(again, "Mandible", image.geometry), labels.array == 7)


def test_a_reviewed_case_becomes_a_template_that_localizes_beside_others(scene, tmp_path):
    """'Add as template' in the results table: a case's segmentation (as corrected) and its scan."""
    from types import SimpleNamespace

    from MedLSAMLib.localizers.hybrid import HybridLocalizer
    from MedLSAMLib.templates import template_from_labels

    image, labels, volume = _case_in_scene(scene, "train-pats/pt_100")
    result = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "pt_100 MedLSAM")
    structures = [SimpleNamespace(name="Brainstem", label=1, color=(0.9, 0.6, 0.0)),
                  SimpleNamespace(name="Mandible", label=7, color=(0.6, 0.6, 0.6)),
                  SimpleNamespace(name="Larynx", label=6, color=(0.2, 0.2, 0.9))]
    only = Volume(np.where(np.isin(labels.array, [1, 7]), labels.array, 0), labels.geometry)  # no larynx voxels
    nodes.write_labels_to_segmentation(only, structures, result, volume)
    folder = placement.template_from_segmentation(volume, result, tmp_path / "case", {"Brainstem": 1, "Mandible": 7})
    template = load_template(folder)
    assert list(template.structures) == ["Brainstem", "Mandible"]  # the empty segment is left out
    assert [s.label for s in template.structures.values()] == [1, 7]
    assert np.allclose(template.structures["Mandible"].points,
                       extreme_points_from_mask(labels.array == 7, labels.geometry), atol=1e-4)
    saved = template.load_labels()
    assert np.array_equal(saved.array == 7, labels.array == 7) and np.array_equal(saved.array == 1, labels.array == 1)
    assert volume.GetAttribute(placement.TEMPLATE_ATTRIBUTE) == str(folder)  # the cohort skips it now
    first = tmp_path / "pt_1"
    template_from_labels(*hn_case("train-pats/pt_1"), [(1, "Brainstem"), (7, "Mandible")], first)
    result = HybridLocalizer([first, folder], cache_dir=None).localize(read_ct(hn_case("train-pats/pt_101")[0]))
    assert all(r.present for r in result.structures.values())
