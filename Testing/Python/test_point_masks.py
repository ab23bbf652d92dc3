"""Masks made from six extreme points (MedLSAMLib.point_masks), and their place in templates.

Accuracy on many scans is a benchmark (benchmarks/point_masks.py, benchmarks/template_kinds.py);
these tests check what must hold on any scan: the mask touches all six points and stays inside
their box, on oblique and permuted grids too; on a real CT it is far closer to the contour than
the points' box; a points-only template carries it with its preparation, from the cache, and
makes it again when a point moves.
"""
import json

import numpy as np
import pytest

from MedLSAMLib.errors import InputError
from MedLSAMLib.evaluate import dice
from MedLSAMLib.geometry import box_from_points
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.markups import read_markups, write_markups
from MedLSAMLib.point_masks import mask_from_points, mask_on_image
from MedLSAMLib.templates import extreme_points_from_mask, template_from_labels

from conftest import CORE5, hn_case, phantom


def check_touches_points_inside_box(block, matrix, points, oblique=False):
    """Every mask voxel's centre is inside the points' box (on an oblique grid: within half a voxel
    of it, since the voxel holding a point may have its centre just outside), and each point is
    in a mask voxel."""
    kji = np.argwhere(block)
    lps = (np.hstack([kji[:, ::-1], np.ones((len(kji), 1))]) @ matrix.T)[:, :3]
    box = box_from_points(points)
    slack = 0.5 * np.abs(matrix[:3, :3]).sum(1) if oblique else 1e-3
    assert np.all((lps >= box[0] - slack) & (lps <= box[1] + slack)), "a mask voxel lies outside the points' box"
    # each point is in the mask: a mask voxel whose centre is within half a (block) voxel of it
    at = (np.hstack([points, np.ones((6, 1))]) @ np.linalg.inv(matrix).T)[:, :3]  # block ijk
    voxels = kji[:, ::-1]
    for p, c in zip(points, at):
        assert np.any(np.all(np.abs(voxels - c) <= 0.5 + 1e-6, axis=1)), f"no mask voxel at the point {p}"


def test_a_ball_on_oblique_and_permuted_grids_is_found_from_its_six_points(geometry):
    centre = geometry.ijk_to_lps((np.asarray(geometry.size) - 1) / 2)
    ball = phantom(geometry, centre, 9.0, inside=40.0, outside=-100.0)
    points = extreme_points_from_mask(ball.array > 0, geometry)
    block, matrix = mask_from_points(ball, points)
    check_touches_points_inside_box(block, matrix, points, oblique=True)
    made = mask_on_image(block, matrix, geometry)
    assert dice(made, ball.array > 0) > 0.85  # the box of the points alone: about 0.5


def test_points_outside_the_image_are_refused(geometry):
    volume = phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 5.0)
    points = extreme_points_from_mask(volume.array > 0, geometry) + np.array([0.0, 0.0, 500.0])
    with pytest.raises(InputError, match="outside its image"):
        mask_from_points(volume, points)


def test_on_real_ct_the_masks_touch_the_points_and_beat_the_box():
    ct_path, labels_path = hn_case("train-pats/pt_1")
    ct, labels = read_ct(ct_path), read_labels(labels_path)
    made_dice, box_dice = [], []
    for value, name in CORE5:
        truth = labels.array == value
        points = extreme_points_from_mask(truth, labels.geometry)
        block, matrix = mask_from_points(ct, points)
        check_touches_points_inside_box(block, matrix, points)
        made_dice.append(dice(mask_on_image(block, matrix, ct.geometry), truth))
        kji = ct.geometry.lps_to_ijk(points)[:, ::-1]
        grid = np.indices(truth.shape).transpose(1, 2, 3, 0)
        box_dice.append(dice(np.all((grid >= np.floor(kji.min(0))) & (grid <= np.ceil(kji.max(0))), -1), truth))
    # measured on pt_1: 0.76 mean, each structure above 0.5; the points' box: 0.36
    assert np.mean(made_dice) > 0.65 and min(made_dice) > 0.4, made_dice
    assert np.mean(made_dice) > np.mean(box_dice) + 0.2


def points_only_template(tmp_path, case="train-pats/pt_1"):
    ct, labels = hn_case(case)
    d = tmp_path / case.split("/")[1]
    template_from_labels(ct, labels, CORE5, d)
    manifest = json.loads((d / "template.json").read_text())
    manifest.pop("labels")
    (d / "template.json").write_text(json.dumps(manifest))
    return d


def test_a_points_only_template_carries_its_point_masks_from_the_cache_and_remakes_them(tmp_path):
    template = points_only_template(tmp_path)
    cache = tmp_path / "cache"
    first = HybridLocalizer([template], cache_dir=cache)
    made = first.prepared[0].structures["Mandible"]
    assert made.from_mask and made.mask.any()
    again = HybridLocalizer([template], cache_dir=cache)
    assert again.cache_hits == 1
    assert np.array_equal(again.prepared[0].structures["Mandible"].mask, made.mask)
    assert np.array_equal(again.prepared[0].structures["Mandible"].mask_ijk_to_lps, made.mask_ijk_to_lps)
    # move the mandible's inferior point up one slice: its mask is made again, from the new points
    mrk = template / "Mandible.mrk.json"
    name, points = read_markups(mrk)
    points[1, 2] += 2.5
    write_markups(mrk, name, points)
    moved = HybridLocalizer([template], cache_dir=cache)
    assert moved.cache_hits == 0
    remade = moved.prepared[0].structures["Mandible"]
    assert remade.mask.sum() < made.mask.sum()
    check_touches_points_inside_box(remade.mask, remade.mask_ijk_to_lps, points)


def test_a_points_only_template_gives_the_segmenter_a_prior_for_every_structure(tmp_path):
    template = points_only_template(tmp_path)
    query = read_ct(hn_case("train-pats/pt_100")[0])
    result = HybridLocalizer([template], cache_dir=None).localize(query, priors=True)
    present = {n for n, r in result.structures.items() if r.present}
    assert present == {name for _, name in CORE5}
    assert set(result.priors) == present
    assert all(prob.max() > 0.5 for _, prob in result.priors.values())


def test_no_model_is_loaded_when_every_structure_has_a_carried_mask(tmp_path):
    from MedLSAMLib.localizers import LocalizerSpec
    from MedLSAMLib.settings import RunSettings

    template = points_only_template(tmp_path)
    cohort = RunSettings((str(template),), LocalizerSpec(device="cpu", cache_dir=None)).build()
    labels, record = cohort.segment_volume(read_ct(hn_case("train-pats/pt_100")[0]))
    assert labels.any() and record.models["segmenter"] == {"name": "litemedsam", "loaded": False}
