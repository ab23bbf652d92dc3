import numpy as np
import pytest

from MedLSAMLib import geometry as g
from MedLSAMLib.geometry import Geometry, GeometryError

from conftest import OBLIQUE, PERMUTED


def random_lps(geom: Geometry, n=200, seed=0):
    rng = np.random.default_rng(seed)
    ijk = rng.uniform(-0.5, np.asarray(geom.size) - 0.5, size=(n, 3))
    return geom.ijk_to_lps(ijk)


def test_ijk_lps_round_trip_exact(geometry):
    lps = random_lps(geometry)
    back = geometry.ijk_to_lps(geometry.lps_to_ijk(lps))
    assert np.max(np.abs(back - lps)) < 1e-6


def test_matrices_agree_with_point_functions(geometry):
    ijk = np.array([[1.0, 2.0, 3.0], [7.5, 0.0, 19.0]])
    hom = np.c_[ijk, np.ones(2)]
    assert np.allclose((geometry.ijk_to_lps_matrix @ hom.T).T[:, :3], geometry.ijk_to_lps(ijk))
    assert np.allclose(geometry.lps_to_ijk_matrix @ geometry.ijk_to_lps_matrix, np.eye(4), atol=1e-12)
    ras = (geometry.ijk_to_ras_matrix @ hom.T).T[:, :3]
    assert np.allclose(ras, g.lps_to_ras(geometry.ijk_to_lps(ijk)))
    assert np.allclose(geometry.ras_to_ijk(ras), ijk)


def test_a_binned_grid_puts_each_voxel_at_its_block_centre(geometry):
    """Blocks of 2 x 3 x 4 voxels: each coarse voxel lies at the mean of its block's voxel
    centres (on oblique and permuted grids), and partial blocks at the far end are dropped."""
    coarse = geometry.binned((2, 3, 4))
    assert coarse.size == (20, 10, 5) and np.allclose(coarse.spacing, geometry.spacing * [2, 3, 4])
    block = np.stack(np.meshgrid(np.arange(2, 4), np.arange(3, 6), np.arange(8, 12), indexing="ij"), -1).reshape(-1, 3)
    assert np.allclose(coarse.ijk_to_lps(np.array([1.0, 1.0, 2.0])), geometry.ijk_to_lps(block.astype(float)).mean(0))


def test_lps_ras_flip_is_involution():
    p = np.array([[1.0, -2.0, 3.0]])
    assert np.allclose(g.lps_to_ras(p), [[-1.0, 2.0, 3.0]])
    assert np.allclose(g.ras_to_lps(g.lps_to_ras(p)), p)


def test_lps_canonical_round_trip_exact(geometry):
    """LPS -> canonical voxel -> LPS is exact to 1e-6 mm on oblique and permuted volumes."""
    canon = g.canonical_geometry(geometry, spacing=3.0)
    lps = random_lps(geometry, seed=1)
    vox = canon.lps_to_ijk(lps)
    assert np.max(np.abs(canon.ijk_to_lps(vox) - lps)) < 1e-6
    # and original ijk -> canonical ijk -> original ijk
    ijk = geometry.lps_to_ijk(lps)
    back = g.map_points(g.map_points(ijk, geometry, canon), canon, geometry)
    assert np.max(np.abs(back - ijk)) < 1e-9


def test_canonical_grid_orientation_and_coverage(geometry):
    canon = g.canonical_geometry(geometry, spacing=3.0)
    assert np.allclose(canon.spacing, 3.0)
    # numpy array axes [a0, a1, a2] = ITK k, j, i run Superior, Anterior, Left.
    step = canon.ijk_to_lps([[0, 0, 1], [0, 1, 0], [1, 0, 0]]) - canon.origin
    assert np.allclose(step[0], [0, 0, 3])  # k -> +z superior
    assert np.allclose(step[1], [0, -3, 0])  # j -> -y anterior
    assert np.allclose(step[2], [3, 0, 0])  # i -> +x left
    # every original voxel centre falls inside the canonical grid
    corners = geometry.corners_lps()
    assert np.all(canon.contains_lps(corners, tolerance=1e-6))


def test_axial_axis():
    assert Geometry([0, 0, 0], [1, 1, 1], np.eye(3), (2, 2, 2)).axial_axis == 2
    assert Geometry([0, 0, 0], [1, 1, 1], PERMUTED, (2, 2, 2)).axial_axis == 2
    sagittal_stack = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert Geometry([0, 0, 0], [1, 1, 1], sagittal_stack, (2, 2, 2)).axial_axis == 0
    assert Geometry([0, 0, 0], [1, 1, 1], OBLIQUE, (2, 2, 2)).axial_axis == int(np.argmax(np.abs(OBLIQUE[2])))


def test_spacing_along_lps_and_back_on_permuted_and_oblique_grids():
    sagittal_stack = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # i -> S, k -> L
    grid = Geometry([0, 0, 0], [0.7, 0.9, 3.0], sagittal_stack, (2, 2, 2))
    assert np.allclose(grid.spacing_lps, [3.0, 0.9, 0.7])  # L, P, S
    assert np.allclose(grid.index_spacing([3.0, 0.9, 0.7]), [0.7, 0.9, 3.0])
    assert np.allclose(Geometry([0, 0, 0], [1, 2, 3], PERMUTED, (2, 2, 2)).index_spacing(
        Geometry([0, 0, 0], [1, 2, 3], PERMUTED, (2, 2, 2)).spacing_lps), [1, 2, 3])
    oblique = Geometry([0, 0, 0], [1.0, 1.0, 1.0], OBLIQUE, (2, 2, 2))  # isotropic: every weighting of 1 mm
    assert np.all(oblique.spacing_lps >= 1.0 - 1e-9) and np.all(oblique.spacing_lps <= np.sqrt(3) + 1e-9)


def test_geometry_rejects_bad_input():
    with pytest.raises(GeometryError):
        Geometry([0, 0, 0], [1, 0, 1], np.eye(3), (2, 2, 2))
    with pytest.raises(GeometryError):
        Geometry([0, 0, 0], [1, 1, 1], np.ones((3, 3)), (2, 2, 2))


def test_box_iou_and_wall_distance():
    a = np.array([[0, 0, 0], [10, 10, 10]])
    b = np.array([[5, 0, 0], [15, 10, 10]])
    assert g.box_iou(a, a) == pytest.approx(1.0)
    assert g.box_iou(a, b) == pytest.approx(500 / 1500)
    assert g.box_iou(a, a + 20) == 0.0
    assert g.wall_distance(a, b) == pytest.approx((5 + 5) / 6)
    assert g.wall_distance(a, b, spacing=(2, 1, 1)) == pytest.approx((10 + 10) / 6)


def test_box_union_expand_clip():
    a = np.array([[0, 0, 0], [1, 1, 1]])
    b = np.array([[-1, 2, 0], [0, 3, 5]])
    assert np.array_equal(g.box_union(a, b), [[-1, 0, 0], [1, 3, 5]])
    assert np.array_equal(g.expand_box(a, 2), [[-2, -2, -2], [3, 3, 3]])
    assert np.array_equal(g.expand_box(a, [1, 0, 0]), [[-1, 0, 0], [2, 1, 1]])
    assert np.array_equal(g.clip_box([[-5, 0, 2], [3, 9, 4]], [0, 0, 0], [2, 5, 5]), [[0, 0, 2], [2, 5, 4]])
    with pytest.raises(GeometryError):
        g.as_box([[1, 1, 1], [0, 0, 0]])


def test_box_ijk_lps_round_trip(geometry):
    box_ijk = np.array([[3, 4, 5], [10, 12, 8]])
    box_lps = g.box_ijk_to_lps(box_ijk, geometry)
    back = g.box_lps_to_ijk(box_lps, geometry)
    # Axis-aligned volumes come back exactly; an oblique one can only grow (the LPS box
    # of a rotated box is larger), never lose the original voxels.
    assert np.all(back[0] <= box_ijk[0]) and np.all(back[1] >= box_ijk[1])
    if not np.allclose(geometry.direction, OBLIQUE):
        assert np.array_equal(back, box_ijk)


def test_extreme_points_box_round_trip():
    box = np.array([[-10.0, 20.0, 100.0], [30.0, 45.0, 160.0]])
    pts = g.extreme_points_from_box(box)
    assert np.allclose(g.box_from_extreme_points(pts), box)
    named = dict(zip(g.POINT_NAMES, pts))
    assert named["superior"][2] == 160 and named["inferior"][2] == 100
    assert named["left"][0] == 30 and named["right"][0] == -10  # LPS: +x is left
    assert named["anterior"][1] == 20 and named["posterior"][1] == 45  # LPS: +y is posterior
    assert np.allclose(g.box_from_extreme_points(named), box)


@pytest.mark.parametrize("swap,message", [
    (("superior", "inferior"), "superior point is below the inferior point"),
    (("left", "right"), "left point is to the right of the right point"),
    (("anterior", "posterior"), "posterior point is in front of the anterior point"),
])
def test_contradictory_points_rejected(swap, message):
    pts = dict(zip(g.POINT_NAMES, g.extreme_points_from_box([[0, 0, 0], [10, 10, 10]])))
    pts[swap[0]], pts[swap[1]] = pts[swap[1]], pts[swap[0]]
    with pytest.raises(GeometryError, match=message):
        g.validate_extreme_points(pts)


def test_point_count_and_names_checked():
    with pytest.raises(GeometryError, match="6 extreme points"):
        g.points_as_array(np.zeros((5, 3)))
    pts = dict(zip(g.POINT_NAMES, np.zeros((6, 3))))
    pts["top"] = pts.pop("superior")
    with pytest.raises(GeometryError, match="unknown point name"):
        g.points_as_array(pts)


def test_slice_boxes_margin_clip_and_gaps():
    geom = Geometry([0, 0, 0], [1, 1, 3], np.eye(3), (512, 512, 40))
    boxes = [[[100, 200, 5], [150, 260, 9]], [[110, 190, 12], [170, 250, 15]]]
    sb = g.slice_boxes(boxes, geom)  # margin = 10 px at 1024 -> 5 px at 512
    assert sorted(sb) == list(range(5, 16))
    assert sb[5] == (95, 195, 155, 265)
    assert sb[13] == (105, 185, 175, 255)
    assert sb[10] == sb[11] == (95, 185, 175, 265)  # the gap takes both neighbours
    edge = g.slice_boxes([[[0, 0, 0], [511, 3, 0]]], geom)
    assert edge[0] == (0, 0, 511, 8)  # clipped to the image


def test_slice_boxes_follow_the_axial_axis_of_permuted_volumes():
    geom = Geometry([0, 0, 0], [2, 2, 2], PERMUTED, (64, 64, 30))  # k is head-foot
    sagittal = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    geom_sag = Geometry([0, 0, 0], [2, 2, 2], sagittal, (30, 64, 64))  # i is head-foot
    assert set(g.slice_boxes([[[10, 20, 3], [20, 30, 4]]], geom)) == {3, 4}
    sb = g.slice_boxes([[[3, 10, 20], [4, 20, 30]]], geom_sag, margin_px_at_1024=0)
    assert set(sb) == {3, 4} and sb[3] == (10, 20, 20, 30)


def test_tolerant_box_from_swapped_points():
    pts = g.extreme_points_from_box([[0, 0, 0], [10, 20, 30]])
    pts[[0, 1]] = pts[[1, 0]]  # superior and inferior crossed, as a bad prediction can
    with pytest.raises(GeometryError):
        g.box_from_extreme_points(pts)
    assert np.allclose(g.box_from_extreme_points(pts, strict=False), [[0, 0, 0], [10, 20, 30]])


@pytest.mark.parametrize("direction", [
    np.eye(3), np.diag([-1.0, -1.0, 1.0]),  # LPS and RAS storage
    PERMUTED, OBLIQUE,
    np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),  # slices along i (axial axis = i)
    np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),  # rows along x, both flipped
], ids=["LPS", "RAS", "permuted", "oblique", "axial-along-i", "swapped-flipped"])
def test_radiological_axial_view_has_anterior_up_and_patient_right_on_the_left(direction):
    geom = Geometry([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], direction, (21, 21, 21))
    centre = geom.ijk_to_lps([10, 10, 10])
    array = np.zeros(geom.shape_kji)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geom.size], indexing="ij"), -1).reshape(-1, 3)
    lps = geom.ijk_to_lps(ijk)
    # anterior-right marker (LPS: x smaller = right, y smaller = anterior) and a fainter posterior-left one
    for offset, value in (([-6.0, -6.0, 0.0], 2.0), ([6.0, 6.0, 0.0], 1.0)):
        near = np.linalg.norm(lps - (centre + offset), axis=1) < 2.5
        for i, j, k in ijk[near]:
            array[k, j, i] = value
    view = g.radiological_axial(array, geom, 10)
    assert view.shape == (21, 21)
    rows, cols = np.nonzero(view == 2.0)
    assert rows.mean() < 10 and cols.mean() < 10, "anterior-right marker at the top left"
    rows, cols = np.nonzero(view == 1.0)
    assert rows.mean() > 10 and cols.mean() > 10, "posterior-left marker at the bottom right"


def test_a_crop_keeps_every_voxel_where_it_was(geometry):
    """Volume.crop / head_foot_slab on identity, oblique and permuted grids: the block's voxels are
    the same voxels at the same LPS positions; a slab keeps exactly the slices in its z range."""
    from MedLSAMLib.io import Volume

    array = np.random.default_rng(1).normal(size=geometry.shape_kji).astype(np.float32)
    volume = Volume(array, geometry, "v")
    lo, hi = np.array([3, 4, 5]), np.array([20, 15, 11])
    block = volume.crop(lo, hi)
    assert block.array.shape == tuple((hi - lo + 1)[::-1])
    assert np.array_equal(block.array, array[5:12, 4:16, 3:21])
    ijk = np.array([[0.0, 0.0, 0.0], [4.0, 2.0, 3.0]])
    assert np.allclose(block.geometry.ijk_to_lps(ijk), geometry.ijk_to_lps(ijk + lo))
    centres = geometry.ijk_to_lps(np.indices(geometry.size).reshape(3, -1).T.astype(float))
    z_lo, z_hi = np.percentile(centres[:, 2], [30, 70])
    slab = volume.head_foot_slab(z_lo, z_hi)
    kept = slab.geometry.ijk_to_lps(np.indices(slab.geometry.size).reshape(3, -1).T.astype(float))[:, 2]
    ax = geometry.axial_axis
    extent = np.abs(geometry.direction[2, :]) @ (geometry.spacing * (np.asarray(geometry.size) - 1))
    # whole slices along the axis nearest head-foot: their centres' z stay within the range, give
    # or take the slice's own tilt on an oblique grid
    tilt = extent - np.abs(geometry.direction[2, ax]) * geometry.spacing[ax] * (geometry.size[ax] - 1)
    assert kept.min() >= z_lo - tilt - 1e-6 and kept.max() <= z_hi + tilt + 1e-6
    assert slab.geometry.size[ax] < geometry.size[ax]
