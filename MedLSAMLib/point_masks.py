"""A structure's mask from its six extreme points, on the CT where they were clicked.

On a template the six points are exact: the structure touches each face of their box at its
point, and it is one connected piece of fairly uniform intensity. Both facts are enough for a
good mask without knowing which organ it is (no structure names here):

1. **Skeleton**: minimal paths between every pair of points through voxels whose intensity is
   close to the points' own (cost grows with the squared deviation; leaving the box is
   expensive). A jaw's paths follow the bone round its horseshoe, a cord's follow the canal.
   The path voxels of consistent intensity are the foreground seeds.
2. **Geodesic competition**: every voxel of the box goes to the nearer, in a distance that
   grows with intensity change (crossing an edge is long), of the foreground seeds and the
   background seeds (everything outside the box; from the second round on, also the box's
   voxels far outside the intensity range of the previous round's mask).
3. Holes filled; only the pieces holding a seed kept; never outside the box.

Measured on the 16 dev scans and 5 templates with their own contours' extreme points (mean Dice
of the five head-and-neck structures): the box 0.37, an ellipsoid in it 0.49, this 0.72; on 30
other scans 0.73 (docs/results.md, ``benchmarks/point_masks.py``). Runs on the image's own voxels, coarsened to
``working_mm`` where finer, so a 1 mm scan costs about what a 2 mm one does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import dijkstra

from .errors import InputError
from .geometry import box_from_points
from .io import Volume


@dataclass(frozen=True)
class PointMaskSettings:
    """Every number of the point-mask maker; part of the template cache key."""

    margin_mm: float = 8.0  # crop around the points' box: the background seeds' shell
    working_mm: float = 2.0  # in-plane voxels finer than this are grouped (cost, not accuracy)
    smooth_voxels: float = 0.6  # Gaussian sigma before any intensity is read
    min_sigma_hu: float = 25.0  # the points' intensity spread is never taken as narrower
    path_cost_cap: float = 30.0
    seed_cost: float = 5.0  # path voxels cheaper than this (about 2 sigma) are foreground seeds
    outside_box_cost: float = 10.0  # a path leaving the box pays this factor
    edge_hu: float = 30.0  # a step of this many HU between neighbours costs as much as 10 voxels of uniform tissue
    rounds: int = 3
    range_quantile: float = 5.0  # rounds > 1: the previous mask's [q, 100 - q] percentiles ...
    range_widen: float = 0.5  # ... widened by this share of their width on each side

    def key(self) -> dict:
        return asdict(self)


def mask_from_points(volume: Volume, points_lps: np.ndarray,
                     settings: PointMaskSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 mask [k, j, i] of the block around the points, that block's ijk -> LPS matrix):
    the same layout as a label map's crop (localizers.prepared.mask_crop). Every point's voxel
    is in the mask; no other voxel whose centre lies outside the points' LPS box is (on an
    oblique grid a point's own voxel may have its centre just outside)."""
    st = settings or PointMaskSettings()
    points_lps = np.asarray(points_lps, float).reshape(-1, 3)
    geometry = volume.geometry
    if not np.all(geometry.contains_lps(points_lps, tolerance=0.5)):
        raise InputError("a structure's point lies outside its image")
    # the block: the points' index box + the margin, on a grid coarsened to about working_mm
    stride = np.maximum(np.floor(st.working_mm / geometry.spacing + 1e-6).astype(int), 1)  # i, j, k
    kji_points = geometry.lps_to_ijk(points_lps)[:, ::-1]
    margin = np.ceil(st.margin_mm / geometry.spacing[::-1]).astype(int)
    size = np.array(geometry.shape_kji)
    lo = np.maximum(np.floor(kji_points.min(0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(kji_points.max(0)).astype(int) + margin, size - 1)
    step = stride[::-1]
    block = volume.array[lo[0]:hi[0] + 1:step[0], lo[1]:hi[1] + 1:step[1], lo[2]:hi[2] + 1:step[2]]
    spacing_kji = geometry.spacing[::-1] * step
    ijk_to_lps = geometry.ijk_to_lps_matrix @ _index_map(lo[::-1], stride)

    inside = _inside_box(block.shape, ijk_to_lps, box_from_points(points_lps))
    image = ndimage.gaussian_filter(block.astype(np.float32), st.smooth_voxels)
    seeds = np.ravel_multi_index(
        np.clip(np.rint((kji_points - lo) / step).astype(int), 0, np.array(block.shape) - 1).T, block.shape)
    mask = _segment(image, spacing_kji, inside, np.unique(seeds), st)
    return mask.astype(np.uint8), ijk_to_lps


def mask_on_image(block: np.ndarray, block_to_lps: np.ndarray, geometry) -> np.ndarray:
    """A block mask (``mask_from_points``' output) as a boolean mask of the whole image grid: each
    image voxel takes the block voxel nearest to it (a coarsened block voxel covers its stride)."""
    out = np.zeros(geometry.shape_kji, bool)
    to_block = np.linalg.inv(geometry.lps_to_ijk_matrix @ block_to_lps)  # image ijk -> block ijk
    corners = np.array([[a, b, c, 1.0] for a in (-0.5, block.shape[2] - 0.5) for b in (-0.5, block.shape[1] - 0.5)
                        for c in (-0.5, block.shape[0] - 0.5)]) @ np.linalg.inv(to_block).T
    lo = np.clip(np.floor(corners[:, :3].min(0)), 0, np.array(geometry.size) - 1).astype(int)
    hi = np.clip(np.ceil(corners[:, :3].max(0)), 0, np.array(geometry.size) - 1).astype(int)
    k, j, i = np.meshgrid(*(np.arange(lo[a], hi[a] + 1) for a in (2, 1, 0)), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], -1).reshape(-1, 4).astype(float) @ to_block.T
    b = np.rint(ijk[:, :3]).astype(int)
    ok = np.all((b >= 0) & (b < np.array(block.shape[::-1])), axis=1)
    values = np.zeros(len(b), bool)
    values[ok] = block[b[ok, 2], b[ok, 1], b[ok, 0]] > 0
    out[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = values.reshape(k.shape)
    return out


def _index_map(lo_ijk, stride_ijk) -> np.ndarray:
    """Block index -> image index (ijk, homogeneous)."""
    m = np.diag([*map(float, stride_ijk), 1.0])
    m[:3, 3] = lo_ijk
    return m


def _inside_box(shape, ijk_to_lps: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Voxels of a block whose centres lie in an LPS box (+ a hair, so the points' own voxels do)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], -1).reshape(-1, 4).astype(float)
    lps = (ijk @ ijk_to_lps.T)[:, :3]
    ok = np.all((lps >= box[0] - 1e-3) & (lps <= box[1] + 1e-3), axis=1)
    return ok.reshape(shape)


def _grid_graph(shape, spacing_kji, weight) -> sparse.csr_matrix:
    """The 6-connected grid of a block as a sparse graph; ``weight(a, b, step_mm)`` per edge."""
    index = np.arange(int(np.prod(shape))).reshape(shape)
    rows, cols, weights = [], [], []
    for axis in range(3):
        a = np.take(index, np.arange(shape[axis] - 1), axis=axis).ravel()
        b = np.take(index, np.arange(1, shape[axis]), axis=axis).ravel()
        rows.append(a)
        cols.append(b)
        weights.append(weight(a, b, float(spacing_kji[axis])))
    n = index.size
    rows, cols, weights = map(np.concatenate, (rows, cols, weights))
    return sparse.coo_matrix((weights + 1e-9, (rows, cols)), shape=(n, n)).tocsr()


def _path(predecessors: np.ndarray, source: int, target: int) -> list[int]:
    out = [target]
    while out[-1] != source and predecessors[out[-1]] >= 0:
        out.append(int(predecessors[out[-1]]))
    return out


def _segment(image: np.ndarray, spacing_kji, inside: np.ndarray, seeds: np.ndarray,
             st: PointMaskSettings) -> np.ndarray:
    values = image.ravel()
    at_points = values[seeds]
    centre = float(np.median(at_points))
    spread = max(1.4826 * float(np.median(np.abs(at_points - centre))), st.min_sigma_hu)
    cost = np.minimum(1.0 + ((values - centre) / spread) ** 2, st.path_cost_cap)
    cost = np.where(inside.ravel(), cost, cost * st.outside_box_cost)
    paths = _grid_graph(image.shape, spacing_kji, lambda a, b, s: s * 0.5 * (cost[a] + cost[b]))
    _, predecessors = dijkstra(paths, directed=False, indices=seeds, return_predecessors=True)
    skeleton = set(seeds.tolist())
    for x in range(len(seeds)):
        for y in range(x + 1, len(seeds)):
            skeleton.update(_path(predecessors[x], int(seeds[x]), int(seeds[y])))
    skeleton = np.array(sorted(skeleton))
    foreground = np.union1d(skeleton[cost[skeleton] < st.seed_cost], seeds)

    edges = _grid_graph(image.shape, spacing_kji, lambda a, b, s: s * (0.1 + np.abs(values[a] - values[b]) / st.edge_hu))
    to_foreground = dijkstra(edges, directed=False, indices=foreground, min_only=True)  # the same every round
    outside = ~inside
    mask = None
    for _ in range(max(st.rounds, 1)):
        background = outside
        if mask is not None and mask.any():
            low, high = np.percentile(image[mask], [st.range_quantile, 100 - st.range_quantile])
            widen = st.range_widen * (high - low)
            background = outside | (inside & ((image < low - widen) | (image > high + widen)))
        background_seeds = np.setdiff1d(np.flatnonzero(background.ravel()), foreground)
        to_background = (dijkstra(edges, directed=False, indices=background_seeds, min_only=True)
                         if len(background_seeds) else np.full_like(to_foreground, np.inf))
        mask = (to_foreground < to_background).reshape(image.shape) & inside
        mask = ndimage.binary_fill_holes(mask) & inside
        pieces, count = ndimage.label(mask)
        if count > 1:
            keep = np.unique(pieces.ravel()[foreground])
            mask = np.isin(pieces, keep[keep > 0])
    mask.flat[seeds] = True  # each point is on its structure, whatever the intensities say
    return mask
