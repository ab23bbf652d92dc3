"""Explicit, separate preprocessing steps: canonical resampling and intensity maps.

Inputs are raw HU. Nothing here modifies its input array.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry, canonical_geometry
from .io import Volume, apply_geometry, to_sitk

#: MedLAM's piecewise-linear HU map (Lei et al.): HU knots -> [0, 1] values.
MEDLAM_HU_KNOTS = (-1000.0, -200.0, 200.0, 1500.0)
MEDLAM_VALUE_KNOTS = (0.0, 0.2, 0.8, 1.0)

#: Default SAM display window in HU (paper / reference: clip to [-500, 1000]).
SAM_WINDOW = (-500.0, 1000.0)

AIR_HU = -1024.0


def medlam_intensity(hu: np.ndarray) -> np.ndarray:
    """HU -> MedLAM network input in [0, 1] (float32, new array)."""
    return np.interp(np.asarray(hu, dtype=np.float32), MEDLAM_HU_KNOTS, MEDLAM_VALUE_KNOTS).astype(np.float32)


def window_to_uint8(hu: np.ndarray, window=SAM_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and scale linearly to 0..255 (uint8, new array)."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"intensity window must have lo < hi, got {window}")
    scaled = (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def resample(volume: Volume, target: Geometry, *, linear: bool = True, default: float = AIR_HU) -> Volume:
    """Resample onto ``target`` (linear for images, nearest for labels)."""
    ref = sitk.Image([int(s) for s in target.size], sitk.sitkUInt8)
    apply_geometry(ref, target)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    src = to_sitk(volume)
    if linear and src.GetPixelID() != sitk.sitkFloat32:
        src = sitk.Cast(src, sitk.sitkFloat32)
    out = sitk.Resample(src, ref, sitk.Transform(), interp, float(default), src.GetPixelID())
    return Volume(sitk.GetArrayFromImage(out), target, volume.name, dict(volume.meta))


def to_canonical(volume: Volume, spacing: float = 3.0, default: float = AIR_HU) -> Volume:
    """Resample a HU volume onto its canonical grid (array axes S, A, L; isotropic)."""
    return resample(volume, canonical_geometry(volume.geometry, spacing), linear=True, default=default)
