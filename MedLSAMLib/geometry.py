"""All coordinate geometry of MedLSAM lives here.

Conventions (read these before touching anything below):

* Physical points are **LPS millimetres** (DICOM / ITK convention): +x = patient Left,
  +y = Posterior, +z = Superior. Slicer shows RAS; :func:`lps_to_ras` converts.
* Voxel indices are **ijk**, i fastest, exactly as ITK and Slicer index a volume.
  A numpy array read through SimpleITK (or Slicer's ``arrayFromVolume``) is indexed
  ``array[k, j, i]``; :func:`ijk_to_kji` makes the swap explicit.
* A :class:`Geometry` maps ijk to LPS with ``lps = origin + direction @ (spacing * ijk)``,
  where the columns of ``direction`` are the LPS unit vectors of the i, j, k axes.
  Oblique and permuted volumes are therefore handled by the same two lines of algebra.
* The **canonical grid** is the frame MedLAM works in: isotropic (3 mm by default), and
  oriented so that its numpy array ``[a0, a1, a2]`` runs Superior, Anterior, Left. That is the
  (z, y, x) = (S, A, L) order the reference network was trained in; as an ITK image it has
  direction columns i -> +x (L), j -> -y (A), k -> +z (S).
* Boxes are ``(2, 3)`` arrays ``[lo, hi]``. Voxel boxes are inclusive integer bounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import GeometryError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: Names of the six extreme points of a structure, in the order they are stored.
POINT_NAMES: tuple[str, ...] = ("superior", "inferior", "right", "left", "anterior", "posterior")

# For each extreme point: which LPS axis it bounds and whether it is the max (+1) or min (-1).
_POINT_AXIS = {
    "superior": (2, +1),
    "inferior": (2, -1),
    "right": (0, -1),
    "left": (0, +1),
    "anterior": (1, -1),
    "posterior": (1, +1),
}

#: LPS directions of the canonical i, j, k axes (columns): L, A(= -P), S.
CANONICAL_DIRECTION = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])


def lps_to_ras(points) -> np.ndarray:
    """Flip x and y; works for a single point or an ``(N, 3)`` array. Its own inverse."""
    return np.asarray(points, dtype=float) @ LPS_TO_RAS


ras_to_lps = lps_to_ras


def ijk_to_kji(a) -> np.ndarray:
    """Reverse the last axis: ijk points <-> numpy (k, j, i) array order."""
    return np.asarray(a)[..., ::-1]


kji_to_ijk = ijk_to_kji


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in physical space: ``lps = origin + direction @ (spacing * ijk)``."""

    origin: np.ndarray  # (3,) LPS mm of voxel (0, 0, 0)'s centre
    spacing: np.ndarray  # (3,) mm along i, j, k
    direction: np.ndarray  # (3, 3) columns = LPS unit vectors of i, j, k
    size: tuple[int, int, int]  # number of voxels along i, j, k

    def __post_init__(self):
        origin = np.asarray(self.origin, dtype=float).reshape(3)
        spacing = np.asarray(self.spacing, dtype=float).reshape(3)
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
            raise GeometryError(f"voxel spacing must be positive, got {spacing.tolist()}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise GeometryError("direction cosines are not orthonormal")
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))

    # -- affine -------------------------------------------------------------------------
    @property
    def ijk_to_lps_matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing[None, :]
        m[:3, 3] = self.origin
        return m

    @property
    def lps_to_ijk_matrix(self) -> np.ndarray:
        m = np.eye(4)
        # Inverse of D*S is S^-1 * D^T because D is orthonormal: exact, no matrix inversion.
        m[:3, :3] = self.direction.T / self.spacing[:, None]
        m[:3, 3] = -m[:3, :3] @ self.origin
        return m

    @property
    def ijk_to_ras_matrix(self) -> np.ndarray:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.ijk_to_lps_matrix

    def ijk_to_lps(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction * self.spacing[None, :]).T + self.origin

    def lps_to_ijk(self, lps) -> np.ndarray:
        lps = np.asarray(lps, dtype=float)
        return ((lps - self.origin) @ self.direction) / self.spacing

    def ijk_to_ras(self, ijk) -> np.ndarray:
        return lps_to_ras(self.ijk_to_lps(ijk))

    def ras_to_ijk(self, ras) -> np.ndarray:
        return self.lps_to_ijk(ras_to_lps(ras))

    # -- queries ------------------------------------------------------------------------
    def contains_ijk(self, ijk, tolerance: float = 0.5) -> np.ndarray:
        """True where a continuous index lies inside the image (voxel centres +- tolerance)."""
        ijk = np.asarray(ijk, dtype=float)
        upper = np.asarray(self.size, dtype=float) - 1 + tolerance
        return np.all((ijk >= -tolerance) & (ijk <= upper), axis=-1)

    def contains_lps(self, lps, tolerance: float = 0.5) -> np.ndarray:
        return self.contains_ijk(self.lps_to_ijk(lps), tolerance)

    @property
    def spacing_lps(self) -> np.ndarray:
        """Voxel size along L, P and S (mm): each index axis's spacing, weighted by how much that
        axis points along L, P or S (exact for axis-aligned and permuted grids)."""
        return np.abs(self.direction) @ self.spacing

    def index_spacing(self, spacing_lps) -> np.ndarray:
        """A size given along L, P and S, expressed along this grid's i, j, k (the inverse of
        :attr:`spacing_lps`'s weighting)."""
        return np.abs(self.direction).T @ np.asarray(spacing_lps, dtype=float)

    @property
    def axial_axis(self) -> int:
        """Index (0=i, 1=j, 2=k) of the voxel axis closest to the head-foot (z) direction."""
        return int(np.argmax(np.abs(self.direction[2, :])))

    def corner_indices(self) -> np.ndarray:
        """The 8 corner voxel centres as ijk, ``(8, 3)``."""
        hi = np.asarray(self.size, dtype=float) - 1
        return np.array([[a, b, c] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])])

    def corners_lps(self) -> np.ndarray:
        return self.ijk_to_lps(self.corner_indices())

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        """Shape of the numpy array holding this grid (k, j, i)."""
        return tuple(reversed(self.size))

    def sub_grid(self, lo_ijk, hi_ijk) -> "Geometry":
        """The block of voxels ``lo_ijk``..``hi_ijk`` (inclusive) as a grid of its own."""
        lo, hi = np.asarray(lo_ijk, int), np.asarray(hi_ijk, int)
        return Geometry(self.ijk_to_lps(lo.astype(float)), self.spacing, self.direction,
                        tuple(int(v) for v in hi - lo + 1))

    def binned(self, factors) -> "Geometry":
        """The grid of whole blocks of ``factors`` (i, j, k) voxels, each voxel at its block's
        centre; a partial block at the far end is dropped (as ITK's BinShrink)."""
        f = np.asarray(factors, dtype=int)
        centre = self.ijk_to_lps((f - 1) / 2.0)
        return Geometry(centre, self.spacing * f, self.direction, tuple(int(v) for v in np.asarray(self.size) // f))

    def is_close(self, other: "Geometry", atol: float = 1e-4) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


def radiological_axial(array: np.ndarray, geometry: Geometry, index: int) -> np.ndarray:
    """Axial slice ``index`` (along ``geometry.axial_axis``) of a ``[k, j, i]`` array as a picture is
    read in radiology: anterior at the top, the patient's right on the image's left, whatever the
    order and signs of the file's axes (in-plane axes snapped to the nearest of L and P)."""
    ax = geometry.axial_axis
    in_plane = [a for a in range(3) if a != ax]
    x_axis = max(in_plane, key=lambda a: abs(geometry.direction[0, a]))  # the one running right -> left
    y_axis = next(a for a in in_plane if a != x_axis)  # anterior -> posterior
    view = np.transpose(array, (2 - ax, 2 - y_axis, 2 - x_axis))[index]
    if geometry.direction[1, y_axis] < 0:  # rows must run towards posterior (+y in LPS)
        view = view[::-1, :]
    if geometry.direction[0, x_axis] < 0:  # columns towards the patient's left (+x in LPS)
        view = view[:, ::-1]
    return view


def rotation_xyz(ax: float, ay: float, az: float) -> np.ndarray:
    """3x3 rotation by ``ax``, ``ay``, ``az`` radians about x, then y, then z (Rz Ry Rx)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def map_points(points, source: Geometry, target: Geometry) -> np.ndarray:
    """Continuous ijk in ``source`` -> continuous ijk in ``target`` (through LPS)."""
    return target.lps_to_ijk(source.ijk_to_lps(points))


def canonical_geometry(source: Geometry, spacing: float = 3.0) -> Geometry:
    """The canonical (S, A, L ordered, isotropic) grid covering ``source``.

    The grid is axis-aligned with LPS and spans the bounding box of the source's voxel
    centres, so every source voxel has a canonical neighbour and no tissue is cropped.
    """
    if spacing <= 0:
        raise GeometryError("canonical spacing must be positive")
    corners = source.corners_lps()
    # Coordinates of the corners along the canonical axes (L, A, S as +x, -y, +z).
    along = corners @ CANONICAL_DIRECTION
    lo, hi = along.min(axis=0), along.max(axis=0)
    size = np.ceil((hi - lo) / spacing - 1e-6).astype(int) + 1
    origin = CANONICAL_DIRECTION @ lo
    return Geometry(origin, np.full(3, float(spacing)), CANONICAL_DIRECTION, tuple(size))


# ---------------------------------------------------------------------------------------
# Boxes: (2, 3) arrays [lo, hi] in one frame (LPS mm, or voxel indices).
# ---------------------------------------------------------------------------------------
def as_box(box) -> np.ndarray:
    b = np.asarray(box, dtype=float).reshape(2, 3)
    if np.any(b[1] < b[0]):
        raise GeometryError(f"box has lo > hi: {b.tolist()}")
    return b


def box_from_points(points) -> np.ndarray:
    p = np.asarray(points, dtype=float).reshape(-1, 3)
    return np.stack([p.min(axis=0), p.max(axis=0)])


def box_volume(box) -> float:
    b = as_box(box)
    return float(np.prod(b[1] - b[0]))


def box_iou(a, b) -> float:
    """3D IoU of two boxes in the same frame, continuous extents (no +1, as in the paper)."""
    a, b = as_box(a), as_box(b)
    overlap = np.minimum(a[1], b[1]) - np.maximum(a[0], b[0])
    if np.any(overlap <= 0):
        return 0.0
    inter = float(np.prod(overlap))
    union = box_volume(a) + box_volume(b) - inter
    return inter / union if union > 0 else 0.0


def wall_distance(a, b, spacing=(1.0, 1.0, 1.0)) -> float:
    """Mean absolute offset of the six walls (paper section 4.3), scaled by ``spacing``.

    For boxes in LPS mm leave ``spacing`` at 1; for voxel boxes pass the voxel spacing.
    """
    a, b = as_box(a), as_box(b)
    return float(np.mean(np.abs(a - b) * np.asarray(spacing, dtype=float)[None, :]))


def box_union(*boxes) -> np.ndarray:
    bs = np.stack([as_box(b) for b in boxes])
    return np.stack([bs[:, 0].min(axis=0), bs[:, 1].max(axis=0)])


def expand_box(box, margin) -> np.ndarray:
    """Grow a box by ``margin`` (scalar or per axis) on every side."""
    b = as_box(box)
    m = np.broadcast_to(np.asarray(margin, dtype=float), (3,))
    return np.stack([b[0] - m, b[1] + m])


def clip_box(box, lo, hi) -> np.ndarray:
    """Clip to ``[lo, hi]``; a box entirely outside collapses onto the nearest face."""
    b = as_box(box)
    lo = np.asarray(lo, dtype=float)
    hi = np.asarray(hi, dtype=float)
    return np.stack([np.clip(b[0], lo, hi), np.clip(b[1], lo, hi)])


def box_ijk_to_lps(box_ijk, geometry: Geometry) -> np.ndarray:
    """Axis-aligned LPS bounds of an ijk box's voxel-centre corners."""
    b = as_box(box_ijk)
    corners = np.array([[x, y, z] for x in b[:, 0] for y in b[:, 1] for z in b[:, 2]])
    return box_from_points(geometry.ijk_to_lps(corners))


def box_lps_to_ijk(box_lps, geometry: Geometry, clip: bool = True) -> np.ndarray:
    """Inclusive integer ijk box containing an LPS box (rounded outward), clipped to the image."""
    b = as_box(box_lps)
    corners = np.array([[x, y, z] for x in b[:, 0] for y in b[:, 1] for z in b[:, 2]])
    cont = box_from_points(geometry.lps_to_ijk(corners))
    out = np.stack([np.floor(cont[0] + 1e-6), np.ceil(cont[1] - 1e-6)])
    if clip:
        out = clip_box(out, np.zeros(3), np.asarray(geometry.size) - 1)
    return out.astype(int)


# ---------------------------------------------------------------------------------------
# Six extreme points <-> box
# ---------------------------------------------------------------------------------------
def points_as_array(points: Mapping[str, Sequence[float]] | np.ndarray) -> np.ndarray:
    """A name -> LPS point mapping (or a (6, 3) array in :data:`POINT_NAMES` order) as (6, 3)."""
    if isinstance(points, Mapping):
        names = set(points)
        unknown = names - set(POINT_NAMES)
        missing = set(POINT_NAMES) - names
        if unknown:
            raise GeometryError(f"unknown point name(s) {sorted(unknown)}; expected {list(POINT_NAMES)}")
        if missing:
            raise GeometryError(f"missing point(s) {sorted(missing)}; need all six of {list(POINT_NAMES)}")
        arr = np.array([points[n] for n in POINT_NAMES], dtype=float)
    else:
        arr = np.asarray(points, dtype=float)
    if arr.shape != (6, 3):
        raise GeometryError(f"need 6 extreme points of 3 coordinates, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise GeometryError("extreme points contain non-finite coordinates")
    return arr


def extreme_point_problems(points: dict, tolerance_mm: float = 1e-3) -> list[str]:
    """One message per inconsistent pair among the points placed so far (``{name: LPS}``).

    Each pair must be ordered along its own axis (superior above inferior, left of right,
    anterior in front of posterior). Equal is allowed: a structure may be one voxel thick.
    Missing points are simply not checked, so this also serves a half-finished placement.
    """
    problems = []
    for high, low, axis_name in (("superior", "inferior", "head-foot"),
                                 ("left", "right", "left-right"),
                                 ("posterior", "anterior", "anterior-posterior")):
        if high not in points or low not in points:
            continue
        axis = _POINT_AXIS[high][0]
        vh, vl = float(np.asarray(points[high])[axis]), float(np.asarray(points[low])[axis])
        if vh < vl - tolerance_mm:
            relation = {"superior": "below", "left": "to the right of", "posterior": "in front of"}[high]
            problems.append(f"{high} point is {relation} the {low} point ({axis_name} axis: {vh:.1f} vs {vl:.1f} mm)")
    return problems


def validate_extreme_points(points, tolerance_mm: float = 1e-3) -> np.ndarray:
    """Check the six LPS points are mutually consistent; return them as (6, 3)."""
    arr = points_as_array(points)
    problems = extreme_point_problems(dict(zip(POINT_NAMES, arr)), tolerance_mm)
    if problems:
        raise GeometryError(problems[0])
    return arr


def box_from_extreme_points(points, strict: bool = True) -> np.ndarray:
    """LPS box bounded by the six extreme points (only each point's own axis is used).

    ``strict=False`` accepts swapped pairs (predicted points can cross on a thin structure)
    and takes the smaller and larger of each pair.
    """
    arr = validate_extreme_points(points) if strict else points_as_array(points)
    pairs = [(arr[n, _POINT_AXIS[name][0]], _POINT_AXIS[name]) for n, name in enumerate(POINT_NAMES)]
    lo, hi = np.empty(3), np.empty(3)
    for axis in range(3):
        vals = [v for v, (a, _) in pairs if a == axis]
        lo[axis], hi[axis] = min(vals), max(vals)
    return np.stack([lo, hi])


def extreme_points_from_box(box_lps) -> np.ndarray:
    """Six points at the centres of the box faces, in :data:`POINT_NAMES` order."""
    b = as_box(box_lps)
    centre = b.mean(axis=0)
    out = np.tile(centre, (6, 1))
    for n, name in enumerate(POINT_NAMES):
        axis, sign = _POINT_AXIS[name]
        out[n, axis] = b[1, axis] if sign > 0 else b[0, axis]
    return out


def point_axis(name: str) -> tuple[int, int]:
    """(LPS axis, +1 for max / -1 for min) of an extreme point name."""
    return _POINT_AXIS[name]


# ---------------------------------------------------------------------------------------
# Per-slice 2D boxes for the segmenter
# ---------------------------------------------------------------------------------------
def slice_boxes(boxes_ijk, geometry: Geometry, margin_px_at_1024: float = 10.0) -> dict[int, tuple[int, int, int, int]]:
    """One 2D box per axial slice from a structure's inclusive ijk box(es).

    Slices run along ``geometry.axial_axis``; the 2D box is ``(u0, v0, u1, v1)`` over the two
    other voxel axes in increasing order (for an axial-stored CT: u = i = column, v = j = row),
    grown by the paper's 10 px margin at SAM's 1024 input size (scaled to this slice size) and
    clipped to the image. Sub-boxes that overlap on a slice are united; slices in a gap
    between sub-boxes get the union of the sub-boxes on either side, so a structure is never
    cut in two by a localization gap.
    """
    boxes = [np.asarray(b, dtype=int).reshape(2, 3) for b in boxes_ijk]
    if not boxes:
        return {}
    ax = geometry.axial_axis
    u_ax, v_ax = [a for a in range(3) if a != ax]
    size = np.asarray(geometry.size)
    margin = margin_px_at_1024 * size / 1024.0
    per_slice: dict[int, list[np.ndarray]] = {}
    for b in boxes:
        for s in range(int(b[0, ax]), int(b[1, ax]) + 1):
            per_slice.setdefault(s, []).append(b)
    covered = sorted(per_slice)
    for s in range(covered[0], covered[-1] + 1):
        if s not in per_slice:  # gap: take the neighbours on both sides
            below = max(c for c in covered if c < s)
            above = min(c for c in covered if c > s)
            per_slice[s] = per_slice[below] + per_slice[above]
    out = {}
    for s, bs in sorted(per_slice.items()):
        if not 0 <= s < size[ax]:
            continue
        lo = np.min([b[0] for b in bs], axis=0)
        hi = np.max([b[1] for b in bs], axis=0)
        u0 = int(max(0, np.floor(lo[u_ax] - margin[u_ax])))
        v0 = int(max(0, np.floor(lo[v_ax] - margin[v_ax])))
        u1 = int(min(size[u_ax] - 1, np.ceil(hi[u_ax] + margin[u_ax])))
        v1 = int(min(size[v_ax] - 1, np.ceil(hi[v_ax] + margin[v_ax])))
        out[s] = (u0, v0, u1, v1)
    return out
