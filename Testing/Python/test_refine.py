"""The deformable refinement and weighted fusion of carried masks (localizers/refine.py), on the
shipped demo patients (real CT and clinical contours: no ../shared needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from MedLSAMLib.geometry import Geometry
from MedLSAMLib.io import Volume, read_ct, read_labels
from MedLSAMLib.localizers import refine
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.localizers.prepared import HybridSettings
from MedLSAMLib.templates import template_from_labels

DEMO = Path(__file__).resolve().parents[2] / "MedLSAMLib" / "data" / "demo"
CASE = "pt_16"
STRUCTURES = [(1, "Brainstem"), (3, "RightParotid"), (4, "LeftParotid"), (7, "Mandible")]


def demo_case():
    return (read_ct(DEMO / "cohort" / f"{CASE}.nii.gz"),
            read_labels(DEMO / "cohort_labels" / f"{CASE}_label.nii.gz"))


def smooth_field(shape_kji, amplitude_vox: float, period_vox: float) -> np.ndarray:
    """A smooth displacement [k, j, i, 3] (voxels along i, j, k): sinusoids in-plane, varying over
    the whole block (no single affine absorbs it)."""
    k, j, i = np.indices(shape_kji).astype(float)
    u = np.zeros((*shape_kji, 3))
    u[..., 0] = amplitude_vox * np.sin(2 * np.pi * j / period_vox) * np.cos(2 * np.pi * k / (2 * period_vox))
    u[..., 1] = amplitude_vox * np.cos(2 * np.pi * i / period_vox) * np.sin(2 * np.pi * k / (2 * period_vox))
    return u


def warp(array: np.ndarray, u: np.ndarray, order: int) -> np.ndarray:
    """array(x + u(x)) on array's own grid."""
    k, j, i = np.indices(array.shape).astype(float)
    coords = [k + u[..., 2], j + u[..., 1], i + u[..., 0]]
    return ndimage.map_coordinates(array.astype(np.float32), coords, order=order, mode="nearest")


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_demons_recovers_a_known_smooth_deformation_of_real_ct_within_a_voxel():
    ct, labels = demo_case()
    kji = np.argwhere(labels.array == 7)  # the mandible and what is around it: bone, muscle, fat
    lo, hi = kji.min(0) - 4, kji.max(0) + 5
    moving = np.clip(ct.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32), -300, 700)
    truth = smooth_field(moving.shape, amplitude_vox=1.5, period_vox=24.0)
    fixed = warp(moving, truth, order=1)
    spacing = ct.geometry.spacing
    found = refine.demons(fixed, moving, spacing, refine.RefineSettings(iterations=120))
    error = np.linalg.norm(found - truth, axis=-1)
    # where the image says something (an edge nearby); flat fat or muscle cannot constrain a field
    edges = ndimage.gaussian_gradient_magnitude(fixed, 1.0) > 30
    inner = np.zeros_like(edges)
    inner[3:-3, 3:-3, 3:-3] = True
    before = np.linalg.norm(truth, axis=-1)[edges & inner]
    after = error[edges & inner]
    assert np.median(before) > 1.0  # the deformation is more than a voxel where it is measured
    assert np.median(after) < 0.5 and np.percentile(after, 90) < 1.0, (np.median(after), np.percentile(after, 90))
    # a smooth field, no folding: the Jacobian determinant of x + u(x) stays positive
    grads = [np.gradient(found[..., c], axis=(2, 1, 0)) for c in range(3)]
    jac = np.stack([np.stack(g, -1) for g in grads], -2) + np.eye(3)
    assert np.linalg.det(jac).min() > 0


def test_the_refined_prior_follows_a_known_deformation_that_an_affine_cannot(tmp_path):
    """A template made from a scan, the same scan deformed as the query: the refined masks land on
    the deformed contours, far closer than the affinely carried ones."""
    ct, labels = demo_case()
    template = template_from_labels(DEMO / "cohort" / f"{CASE}.nii.gz", DEMO / "cohort_labels" / f"{CASE}_label.nii.gz",
                                    STRUCTURES, tmp_path / "self")
    truth = smooth_field(ct.array.shape, amplitude_vox=1.5, period_vox=20.0)
    query = Volume(warp(ct.array, truth, order=1), ct.geometry, "deformed")
    deformed_labels = warp(labels.array, truth, order=0).astype(np.uint8)
    dices = {}
    for arm, settings in {"refined": HybridSettings(), "affine": HybridSettings(refine=None)}.items():
        loc = HybridLocalizer([template], settings=settings, cache_dir=tmp_path / "cache").localize(query, priors=True)
        dices[arm] = {}
        for value, name in STRUCTURES:
            offset, prob = loc.priors[name]
            mask = np.zeros(ct.array.shape, bool)
            k, j, i = offset
            mask[k:k + prob.shape[0], j:j + prob.shape[1], i:i + prob.shape[2]] = prob > 0.5
            dices[arm][name] = dice(mask, deformed_labels == value)
    mean = {arm: np.mean(list(d.values())) for arm, d in dices.items()}
    assert mean["refined"] > mean["affine"] + 0.05, dices
    assert min(dices["refined"].values()) > 0.75, dices


def test_a_misaligned_template_is_left_out_and_a_mismatched_one_weighs_less():
    ct, labels = demo_case()
    parotid = (labels.array == 3).astype(np.float32)
    shifts = [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, -1, 0), (0, 0, 6)]  # the last: 6 voxels (23 mm) off
    masks = [ndimage.shift(parotid, s, order=0) for s in shifts]
    assert refine.leave_out_outliers(masks, refine.RefineSettings().outlier_mad) == [0, 1, 2, 3]
    assert refine.leave_out_outliers(masks[:4], refine.RefineSettings().outlier_mad) == [0, 1, 2, 3]
    # the fused vote of the kept masks is the consensus, not pulled towards the outlier
    fused = refine.fuse(masks[:4], [np.ones_like(parotid)] * 4, threshold=0.4) > 0.5
    assert dice(fused, parotid > 0) > 0.9
    # local similarity: the scan against itself weighs 1, against a shifted copy less
    image = np.clip(ct.array.astype(np.float32), -300, 700)
    valid = np.ones(image.shape, bool)
    settings = refine.RefineSettings()
    same = refine.similarity_weight(image, image, valid, ct.geometry.spacing, settings)
    shifted = refine.similarity_weight(image, ndimage.shift(image, (0, 0, 2), order=1), valid, ct.geometry.spacing,
                                       settings)
    body = labels.array == 7
    assert np.allclose(same, 1.0)
    assert shifted[body].mean() < 0.8


def test_the_vote_threshold_is_the_segmenters_half():
    vote = [np.full((2, 2, 2), v, np.float32) for v in (1.0, 0.0, 0.0, 0.0, 1.0)]  # 2 of 5
    weights = [np.ones((2, 2, 2), np.float32)] * 5
    assert np.allclose(refine.fuse(vote, weights, threshold=0.4), 0.5)
    assert np.all(refine.fuse(vote, weights, threshold=0.5) < 0.5)
    assert np.allclose(refine.fuse([vote[0]] * 3, weights[:3], threshold=0.4), 1.0)
    assert np.allclose(refine.fuse([vote[1]] * 3, weights[:3], threshold=0.4), 0.0)


@pytest.mark.parametrize("direction", ["identity", "oblique", "permuted"])
def test_crop_grids_and_samples_keep_the_query_voxels_on_any_grid(direction):
    from conftest import OBLIQUE, PERMUTED

    cosines = {"identity": np.eye(3), "oblique": OBLIQUE, "permuted": PERMUTED}[direction]
    g = Geometry(origin=[-120.5, 33.25, 810.0], spacing=[0.8, 1.1, 2.5], direction=cosines, size=(40, 30, 20))
    array = np.random.default_rng(0).normal(size=g.shape_kji).astype(np.float32)
    # a grid over a block with no coarsening: exactly the query's voxels, values returned as they are
    fine = refine.crop_grid(g.ijk_to_lps_matrix, [5, 6, 7], [20, 18, 15], refine.RefineSettings(margin_mm=0.0,
                                                                                                  min_spacing_mm=0.1))
    assert fine.shape == (9, 13, 16)
    values = refine.sample(array, g.ijk_to_lps_matrix, fine.positions())
    assert np.allclose(values.numpy(), array[7:16, 6:19, 5:21], atol=1e-5)
    # coarsened to 2 mm: along i (0.8 mm) every 2.5 voxels, along k (2.5 mm) every voxel; positions
    # on the query's axes
    coarse = refine.crop_grid(g.ijk_to_lps_matrix, [5, 6, 7], [20, 18, 15], refine.RefineSettings(margin_mm=0.0))
    assert np.allclose(coarse.spacing, [2.0, 2.0, 2.5])
    ijk = g.lps_to_ijk(coarse.positions().reshape(-1, 3).numpy())
    assert np.allclose(ijk.min(0), [5, 6, 7]) and np.all(ijk.max(0) <= [20 + 1e-6, 18 + 1e-6, 15 + 1e-6])
    assert np.allclose(np.diff(np.unique(ijk[:, 0].round(6))), 2.5)
    # outside the array: the fill value
    far = torch.as_tensor(g.ijk_to_lps(np.array([[-5.0, 0, 0], [0, 0, 100.0]])))
    assert np.allclose(refine.sample(array, g.ijk_to_lps_matrix, far, fill=-7.0).numpy(), -7.0)


def _template_with_labels(tmp_path: Path, name: str, labels_array: np.ndarray, structures) -> Path:
    from MedLSAMLib.io import write_volume

    _, labels = demo_case()
    path = tmp_path / f"{name}_label.nii.gz"
    write_volume(Volume(labels_array.astype(np.uint8), labels.geometry, name), path)
    template_from_labels(DEMO / "cohort" / f"{CASE}.nii.gz", path, structures, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("third", ["wider", "narrower"])
def test_leave_one_template_out_learns_the_cut_that_matches_the_templates_contours(tmp_path, third):
    """Three templates of one scan: two hold its contour, the third the contour grown (or shrunk)
    by a voxel. Left out, a true template is best reproduced by the vote of the true and the wider
    one cut above one half (the wider one's rim left out), or, with a narrower third, cut below it
    (the rim the narrower one lacks kept): the learned cut says which."""
    _, labels = demo_case()
    structures = [(1, "Brainstem"), (7, "Mandible")]
    grow = ndimage.binary_dilation if third == "wider" else ndimage.binary_erosion
    other = np.zeros_like(labels.array)
    for value, _ in structures:
        other[grow(labels.array == value, ndimage.generate_binary_structure(3, 1))] = value
    dirs = [_template_with_labels(tmp_path, n, labels.array, structures) for n in ("a", "b")]
    dirs.append(_template_with_labels(tmp_path, "c", other, structures))
    localizer = HybridLocalizer(dirs, cache_dir=None)
    assert localizer.thresholds == {}  # learned only when masks are first asked for
    learned = localizer.learn_thresholds()
    for name in ("Brainstem", "Mandible"):
        cut = localizer.thresholds[name]
        assert (cut >= 0.5) if third == "wider" else (cut < 0.5), (name, learned)


def test_learned_thresholds_are_cached_with_the_templates(tmp_path, monkeypatch):
    from MedLSAMLib.localizers import loto

    _, labels = demo_case()
    dirs = [_template_with_labels(tmp_path, n, labels.array, [(1, "Brainstem")]) for n in ("a", "b", "c")]
    first = HybridLocalizer(dirs, cache_dir=tmp_path / "cache").learn_thresholds()
    assert list((tmp_path / "cache" / "learned").glob("*.json"))

    def refuse(_):
        raise AssertionError("learned again although cached")

    monkeypatch.setattr(loto, "learn_thresholds", refuse)
    assert HybridLocalizer(dirs, cache_dir=tmp_path / "cache").learn_thresholds()["thresholds"] == first["thresholds"]


def test_with_masks_the_per_slice_boxes_are_the_refined_masks(tmp_path):
    """localize(priors=True): each structure's per-slice boxes are those of its refined mask (> 0.5),
    slice by slice along the axial axis."""
    ct, _ = demo_case()
    template = template_from_labels(DEMO / "cohort" / f"{CASE}.nii.gz", DEMO / "cohort_labels" / f"{CASE}_label.nii.gz",
                                    STRUCTURES[:2], tmp_path / "self")
    loc = HybridLocalizer([template], cache_dir=tmp_path / "cache").localize(ct, priors=True)
    ax = ct.geometry.axial_axis
    for name, (offset, prob) in loc.priors.items():
        ijk = np.argwhere(prob > 0.5)[:, ::-1] + np.asarray(offset)[::-1]
        boxes = loc.structures[name].slice_boxes_ijk
        assert sorted(b[0][ax] for b in boxes) == sorted(np.unique(ijk[:, ax]).tolist())
        for lo, hi in boxes:
            on = ijk[ijk[:, ax] == lo[ax]]
            assert on.min(0).tolist() == lo and on.max(0).tolist() == hi
