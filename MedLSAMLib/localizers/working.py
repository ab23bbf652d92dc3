"""Working images for alignment: HU clamped, air shifted to 0, smoothed, on a coarser grid.

Template and query go through the same function, so their values are comparable. The grid keeps
the scan's own axis directions (no resampling error from a rotation) and only coarsens axes whose
spacing is finer than asked.

A fine scan is first resampled to an intermediate grid of half the working spacing (linear
interpolation costs per output voxel) and smoothed there, not at full resolution; the smoothing
removes what the intermediate step aliases. Per scan, the clamped image and the validity mask are
made once (:class:`WorkingSource`) and shared by every working image. What a 512 x 512 x 300 scan
still costs, and where: docs/results.md ("Seconds per case against scan size").
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..geometry import Geometry, box_from_points
from ..io import Volume, apply_geometry, to_sitk

#: HU range of the global alignment images: air .. dense bone. Values are stored as HU - low, so
#: that the lowest value (and anything outside a scan, which reads as 0) is 0.
HU_RANGE = (-1000.0, 1500.0)
#: HU range of the local (per-structure) images: soft tissue. Fat, muscle, gland and vessels
#: differ by tens of HU; the full range would let bone and air edges decide alone.
SOFT_TISSUE_RANGE = (-250.0, 350.0)


def coarse_geometry(geometry: Geometry, spacing_mm: float) -> Geometry:
    """Same origin corner, directions and extent; spacing raised to ``spacing_mm`` where finer."""
    spacing = np.maximum(geometry.spacing, spacing_mm)
    extent = (np.asarray(geometry.size) - 1) * geometry.spacing
    size = np.floor(extent / spacing + 1e-6).astype(int) + 1
    return Geometry(geometry.origin, spacing, geometry.direction, tuple(int(s) for s in size))


def padding_value(array: np.ndarray) -> float | None:
    """The value that marks voxels with no data, if the scan has one: its minimum, when at least 5 %
    of the voxels hold exactly it (scanner padding outside the reconstruction circle, or a data set
    that blanked everything outside a region, as OpenKBP did). Genuine air is noisy and rarely
    exactly the minimum over such a share of the scan."""
    low = float(array.min())
    return low if np.count_nonzero(array == low) >= 0.05 * array.size else None


class WorkingSource:
    """One scan (or a block of it) ready for :func:`working_image`: its padding found once, its
    clamped images and validity mask made once."""

    def __init__(self, volume: Volume, pad: float | None | str = "find"):
        self.volume = volume
        self.pad = padding_value(volume.array) if pad == "find" else pad
        self._clamped: dict[tuple, sitk.Image] = {}
        self._validity: sitk.Image | None = None

    def crop(self, lo_ijk, hi_ijk) -> "WorkingSource":
        """A block of the scan (padding as found on the whole scan)."""
        return WorkingSource(self.volume.crop(lo_ijk, hi_ijk), self.pad)

    def clamped(self, hu_range: tuple[float, float]) -> sitk.Image:
        if hu_range not in self._clamped:
            image = to_sitk(self.volume)
            if image.GetPixelID() != sitk.sitkFloat32:
                image = sitk.Cast(image, sitk.sitkFloat32)
            self._clamped[hu_range] = sitk.Clamp(image, sitk.sitkFloat32, float(hu_range[0]),
                                                 float(hu_range[1])) - float(hu_range[0])
        return self._clamped[hu_range]

    def validity(self) -> sitk.Image:
        if self._validity is None:
            valid = (self.volume.array != self.pad if self.pad is not None
                     else np.ones(self.volume.array.shape, bool))
            mask = sitk.GetImageFromArray(valid.view(np.uint8))
            apply_geometry(mask, self.volume.geometry)
            self._validity = sitk.Cast(mask, sitk.sitkFloat32)
        return self._validity

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


def working_image(source: Volume | WorkingSource, spacing_mm: float, sigma_mm: float,
                  hu_range: tuple[float, float] = HU_RANGE) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(values, validity, geometry) on the working grid, arrays [k, j, i] float32.

    values: HU clamped to ``hu_range``, shifted so the low end is 0, smoothed by ``sigma_mm``.
    validity: 1 where the scan has data, 0 on padding (see :func:`padding_value`), smoothed alike;
    the alignment leaves points on padding out of its similarity instead of reading them as air.
    """
    source = source if isinstance(source, WorkingSource) else WorkingSource(source)
    geometry = source.volume.geometry
    target = coarse_geometry(geometry, spacing_mm)
    between = coarse_geometry(geometry, spacing_mm / 2)

    def grid(g: Geometry) -> sitk.Image | None:
        if g.is_close(geometry):
            return None
        ref = sitk.Image([int(s) for s in g.size], sitk.sitkUInt8)
        apply_geometry(ref, g)
        return ref

    to_between, to_target = grid(between), grid(target)

    def to_working_grid(full: sitk.Image) -> np.ndarray:
        if to_between is not None:  # fine scan: resample first, smooth on the smaller grid
            full = sitk.Resample(full, to_between, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        if sigma_mm > 0:
            full = sitk.SmoothingRecursiveGaussian(full, float(sigma_mm))
        if to_target is not None:
            full = sitk.Resample(full, to_target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(full)

    values = to_working_grid(source.clamped(hu_range))
    validity = to_working_grid(source.validity())
    # Recursive Gaussians ring slightly: validity must stay a weight in [0, 1].
    return values, np.clip(validity, 0.0, 1.0), target if to_target is not None else geometry


def grid_points(lo: np.ndarray, hi: np.ndarray, spacing_mm: float) -> np.ndarray:
    """LPS points of a regular axis-aligned grid covering the box [lo, hi], (N, 3)."""
    axes = [np.arange(a, b + 1e-6, spacing_mm) for a, b in zip(lo, hi)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
