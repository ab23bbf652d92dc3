"""Working images for alignment: HU clamped, air shifted to 0, smoothed, on a coarser grid.

Template and query go through the same function, so their values are comparable. The grid keeps
the scan's own axis directions (no resampling error from a rotation) and only coarsens axes whose
spacing is finer than asked: a 512 x 512 x 600 CT becomes a few million voxels, a 128^3 CT at 4 mm
stays as it is.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..geometry import Geometry
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


def working_image(volume: Volume, spacing_mm: float, sigma_mm: float,
                  hu_range: tuple[float, float] = HU_RANGE) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """(values, validity, geometry) on the working grid, arrays [k, j, i] float32.

    values: HU clamped to ``hu_range``, shifted so the low end is 0, smoothed by ``sigma_mm``.
    validity: 1 where the scan has data, 0 on padding (see :func:`padding_value`), smoothed alike;
    the alignment leaves points on padding out of its similarity instead of reading them as air.
    """
    target, ref = coarse_geometry(volume.geometry, spacing_mm), None  # ref: the grid to resample onto
    if target.is_close(volume.geometry):
        target = volume.geometry
    else:
        ref = sitk.Image([int(s) for s in target.size], sitk.sitkUInt8)
        apply_geometry(ref, target)

    def to_working_grid(full: sitk.Image) -> np.ndarray:
        """Smooth, then resample: one full-resolution image at a time, so a large scan's peak
        memory is a few copies of it, not of both channels."""
        if sigma_mm > 0:
            full = sitk.SmoothingRecursiveGaussian(full, float(sigma_mm))
        if ref is not None:
            full = sitk.Resample(full, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(full)

    image = to_sitk(volume)
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    image = sitk.Clamp(image, sitk.sitkFloat32, float(hu_range[0]), float(hu_range[1])) - float(hu_range[0])
    values = to_working_grid(image)
    del image
    pad = padding_value(volume.array)
    valid = volume.array != pad if pad is not None else np.ones(volume.array.shape, bool)
    mask = sitk.GetImageFromArray(valid.view(np.uint8))
    del valid
    apply_geometry(mask, volume.geometry)
    validity = to_working_grid(sitk.Cast(mask, sitk.sitkFloat32))
    # Recursive Gaussians ring slightly: validity must stay a weight in [0, 1].
    return values, np.clip(validity, 0.0, 1.0), target


def grid_points(lo: np.ndarray, hi: np.ndarray, spacing_mm: float) -> np.ndarray:
    """LPS points of a regular axis-aligned grid covering the box [lo, hi], (N, 3)."""
    axes = [np.arange(a, b + 1e-6, spacing_mm) for a, b in zip(lo, hi)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
