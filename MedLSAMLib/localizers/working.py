"""Working images for alignment: HU clamped, air shifted to 0, smoothed, on a coarser grid.

Template and query go through the same function, so their values are comparable. The grid keeps
the scan's own axis directions (no resampling error from a rotation) and only coarsens axes whose
spacing is finer than asked.

A scan finer than half the working spacing is first averaged over whole blocks of voxels
(:func:`block_means`: one pass over the scan, no interpolation) to at least half the working spacing,
then smoothed and resampled there, not at full resolution; the smoothing removes what the block
step aliases. (A 128^3 head-and-neck scan of 3.9 x 3.9 x 2.5 mm is averaged only for the 8 mm
search image.) Per
scan, the clamped image, the validity mask and their block averages are made once
(:class:`WorkingSource`) and shared by every working image. What a 512 x 512 x 300 scan costs,
and where: docs/results.md ("A 512 x 512 x 300 scan at about twice a 128^3 one").
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..geometry import Geometry, box_from_points
from ..io import Volume, apply_geometry, geometry_from_sitk, to_sitk

#: HU range of the global alignment images: air .. dense bone. Values are stored as HU - low, so
#: that the lowest value (and anything outside a scan, which reads as 0) is 0.
HU_RANGE = (-1000.0, 1500.0)
#: HU range of the local (per-structure) images: soft tissue. Fat, muscle, gland and vessels
#: differ by tens of HU; the full range would let bone and air edges decide alone.
SOFT_TISSUE_RANGE = (-250.0, 350.0)


def coarse_geometry(geometry: Geometry, spacing_mm) -> Geometry:
    """Same origin corner, directions and extent; spacing raised to ``spacing_mm`` (mm, one for
    every axis or one per i, j, k axis) where finer."""
    spacing = np.maximum(geometry.spacing, spacing_mm)
    extent = (np.asarray(geometry.size) - 1) * geometry.spacing
    size = np.floor(extent / spacing + 1e-6).astype(int) + 1
    return Geometry(geometry.origin, spacing, geometry.direction, tuple(int(s) for s in size))


def shrink_factors(geometry: Geometry, spacing_mm, base=(1, 1, 1)) -> tuple[int, int, int]:
    """Whole voxels per block, per i, j, k axis, that bring the scan to at least half the working
    spacing ``spacing_mm`` before it is smoothed (1 where it is already that coarse). Blocks never
    exceed the working spacing itself. Where a multiple of ``base`` (the blocks of a finer working
    image) fits, the smallest one is taken: the blocks are then made from that image's blocks."""
    half = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)) / 2
    least = np.ceil(half / geometry.spacing - 1e-6)
    most = np.floor(2 * half / geometry.spacing + 1e-6)
    factors = np.maximum(1, np.minimum(least, most))
    b = np.asarray(base, dtype=float)
    multiple = np.ceil(np.maximum(least, 1) / b) * b
    factors = np.where((b > 1) & (multiple <= most), multiple, factors)
    return tuple(int(f) for f in factors)


def padding_value(array: np.ndarray) -> float | None:
    """The value that marks voxels with no data, if the scan has one: its minimum, when at least 5 %
    of the voxels hold exactly it (scanner padding outside the reconstruction circle, or a data set
    that blanked everything outside a region, as OpenKBP did). Genuine air is noisy and rarely
    exactly the minimum over such a share of the scan."""
    low = float(array.min())
    return low if np.count_nonzero(array == low) >= 0.05 * array.size else None


class WorkingSource:
    """One scan (or a block of it) ready for :func:`working_image`: its padding found once, its
    clamped images, validity mask and block averages made once."""

    def __init__(self, volume: Volume, pad: float | None | str = "find"):
        self.volume = volume
        self.pad = padding_value(volume.array) if pad == "find" else pad
        self._clamped: dict[tuple, sitk.Image] = {}
        self._validity: sitk.Image | None = None
        self._shrunk: dict[tuple, sitk.Image] = {}

    def crop(self, lo_ijk, hi_ijk) -> "WorkingSource":
        """A block of the scan (padding as found on the whole scan)."""
        return WorkingSource(self.volume.crop(lo_ijk, hi_ijk), self.pad)

    def clamped(self, hu_range: tuple[float, float]) -> sitk.Image:
        """HU clamped to ``hu_range`` (float32), not yet shifted (see :meth:`shrunk`)."""
        if hu_range not in self._clamped:
            self._clamped[hu_range] = sitk.Clamp(to_sitk(self.volume), sitk.sitkFloat32, float(hu_range[0]),
                                                 float(hu_range[1]))
        return self._clamped[hu_range]

    def validity(self) -> sitk.Image:
        if self._validity is None:
            valid = (self.volume.array != self.pad if self.pad is not None
                     else np.ones(self.volume.array.shape, bool))
            mask = sitk.GetImageFromArray(valid.view(np.uint8))
            apply_geometry(mask, self.volume.geometry)
            self._validity = sitk.Cast(mask, sitk.sitkFloat32)
        return self._validity

    def shrunk(self, hu_range: tuple[float, float], factors: tuple[int, int, int]) -> tuple[sitk.Image, sitk.Image]:
        """(values, validity) averaged over blocks of ``factors`` voxels; made once per scan. The
        values are HU clamped to ``hu_range`` and shifted so that its low end is 0. Block averages
        come straight from the scan's array, a slab at a time (:func:`block_means`): no clamped copy
        of a large scan is ever whole in memory."""
        if (hu_range, factors) not in self._shrunk:
            if factors == (1, 1, 1):
                pair = self.clamped(hu_range) - float(hu_range[0]), self.validity()
            elif (finer := self.block_base(hu_range, factors)) != (1, 1, 1):
                # means of equal sub-block means: the same numbers, a fraction of the work
                step = [int(f // b) for f, b in zip(factors, finer)]
                pair = tuple(sitk.BinShrink(image, step) for image in self._shrunk[(hu_range, finer)])
            else:
                grid = self.volume.geometry.binned(factors)
                means = block_means(self.volume.array, factors, hu_range, self.pad)
                pair = tuple(to_sitk(Volume(a, grid)) for a in means)
            self._shrunk[(hu_range, factors)] = pair
        return self._shrunk[(hu_range, factors)]

    def block_base(self, hu_range: tuple[float, float], factors=None) -> tuple[int, int, int]:
        """The largest blocks already made for ``hu_range`` (that divide ``factors``, when given);
        (1, 1, 1) if none."""
        made = [f for (r, f) in self._shrunk if r == hu_range and f != factors
                and (factors is None or all(a % b == 0 for a, b in zip(factors, f)))]
        return max(made, key=lambda f: int(np.prod(f)), default=(1, 1, 1))

    def data_box(self) -> np.ndarray:
        """LPS box of the voxels that hold data (not padding)."""
        geometry = self.volume.geometry
        if self.pad is None:
            return box_from_points(geometry.corners_lps())
        valid = self.volume.array != self.pad
        ranges = []
        for axis in (2, 1, 0):  # i, j, k of an array [k, j, i]
            hit = np.flatnonzero(valid.any(axis=tuple(a for a in range(3) if a != axis)))
            if len(hit) == 0:
                return box_from_points(geometry.corners_lps())
            ranges.append((hit[0], hit[-1]))
        corners = np.array([[a, b, c] for a in ranges[0] for b in ranges[1] for c in ranges[2]], float)
        return box_from_points(geometry.ijk_to_lps(corners))


def block_means(array_kji: np.ndarray, factors: tuple[int, int, int], hu_range: tuple[float, float],
                pad: float | None, slab_voxels: int = 2 ** 21) -> tuple[np.ndarray, np.ndarray]:
    """Means over whole blocks of ``factors`` (i, j, k) voxels of (the scan's values clamped to
    ``hu_range`` and shifted so that its low end is 0, its validity: 1 where the value is not the
    padding ``pad``); float32 [k, j, i] arrays on ``Geometry.binned``'s grid. Both come from one
    pass through slabs of whole blocks of about ``slab_voxels`` voxels, so the float copies stay
    small and in cache (here 2-3x faster than passes over the whole scan)."""
    fi, fj, fk = (int(f) for f in factors)
    nk, nj, ni = (np.asarray(array_kji.shape) // (fk, fj, fi)) * (fk, fj, fi)
    out = np.empty((2, nk // fk, nj // fj, ni // fi), np.float32)
    step = max(1, slab_voxels // max(nj * ni * fk, 1)) * fk
    low, high = float(hu_range[0]), float(hu_range[1])
    both = torch.empty((2, min(step, nk), nj, ni))  # one buffer for every slab: no fresh memory per slab
    with torch.no_grad():
        for k0 in range(0, nk, step):
            n = min(step, nk - k0)
            slab = torch.from_numpy(array_kji[k0:k0 + n, :nj, :ni])  # a strided view
            if slab.is_floating_point() and slab.dtype != torch.float32:
                slab = slab.float()  # integer scans are promoted by clamp itself
            pair = both[:, :n]
            torch.clamp(slab, low, high, out=pair[0]).sub_(low)
            if pad is not None:
                torch.ne(slab, pad, out=pair[1])
            else:
                pair[1].fill_(1.0)
            out[:, k0 // fk:(k0 + n) // fk] = F.avg_pool3d(pair[:, None], (fk, fj, fi))[:, 0].numpy()
    return out[0], out[1]


def working_image(source: Volume | WorkingSource, spacing_mm, sigma_mm: float,
                  hu_range: tuple[float, float] = HU_RANGE) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(values, validity, geometry) on the working grid, arrays [k, j, i] float32.

    values: HU clamped to ``hu_range``, shifted so the low end is 0, smoothed by ``sigma_mm``.
    validity: 1 where the scan has data, 0 on padding (see :func:`padding_value`), smoothed alike;
    the alignment leaves points on padding out of its similarity instead of reading them as air.
    ``spacing_mm``: one spacing, or one per i, j, k axis of the scan.
    """
    source = source if isinstance(source, WorkingSource) else WorkingSource(source)
    target = coarse_geometry(source.volume.geometry, spacing_mm)
    factors = shrink_factors(source.volume.geometry, spacing_mm, source.block_base(hu_range))
    values_full, validity_full = source.shrunk(hu_range, factors)
    # after the block average every axis is at least half the working spacing: smoothed as it is
    geometry = source.volume.geometry if factors == (1, 1, 1) else geometry_from_sitk(values_full)
    to_target = None if target.is_close(geometry) else target

    def to_working_grid(full: sitk.Image) -> np.ndarray:
        if sigma_mm > 0:
            full = sitk.SmoothingRecursiveGaussian(full, float(sigma_mm))
        if to_target is not None:
            full = _resampled(full, to_target)
        return sitk.GetArrayFromImage(full)

    values = to_working_grid(values_full)
    validity = to_working_grid(validity_full)
    # Recursive Gaussians ring slightly: validity must stay a weight in [0, 1].
    return values, np.clip(validity, 0.0, 1.0), target if to_target is not None else geometry


def _resampled(image: sitk.Image, grid: Geometry) -> sitk.Image:
    """``image`` linearly resampled onto ``grid`` (0 outside it), float32."""
    return sitk.Resample(image, [int(v) for v in grid.size], sitk.Transform(), sitk.sitkLinear,
                         [float(v) for v in grid.origin], [float(v) for v in grid.spacing],
                         [float(v) for v in grid.direction.ravel()], 0.0, sitk.sitkFloat32)


def grid_points(lo: np.ndarray, hi: np.ndarray, spacing_mm: float) -> np.ndarray:
    """LPS points of a regular axis-aligned grid covering the box [lo, hi], (N, 3)."""
    axes = [np.arange(a, b + 1e-6, spacing_mm) for a, b in zip(lo, hi)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
