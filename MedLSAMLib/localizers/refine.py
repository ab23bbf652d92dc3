"""Masks that follow the scan's anatomy: each template's carried mask refined by a deformable
registration around its structure, and the templates fused with weights.

One affine per template and structure carries a template's mask onto a scan (``hybrid``); a thin
or curved structure that each template misses by a few millimetres then averages into a thick
band. Here, per (template, structure):

1. **Crop**: a grid over the structure's box + ``margin_mm`` in the query's own axes (the query's
   voxels, coarsened to ``min_spacing_mm`` where finer).
2. **Moving image**: the template's CT around the structure (stored with the prepared template)
   sampled on that grid through the structure's local affine (or its parts' affines).
3. **Demons**: SimpleITK's fast symmetric-forces demons between the query crop and the moving
   image (HU clipped to ``hu_range``), the field smoothed by a Gaussian of ``field_sigma_mm``
   at every step (a smooth field). Voxels where either scan has no data are given the same
   value in both images, so they exert no force and the field there follows its neighbours.
4. **Weights**: per voxel, how well the warped template matches the query nearby (a Gaussian of
   the locally averaged squared HU difference, ``similarity_hu``), as Plastimatch's MABS does.

The refined masks also give the structure's per-slice boxes (the segmenter's slices and, with
SAM, its 2D prompts), in place of those of the template shape nearest the fused box.

Fusion (:func:`fuse`): a template whose warped mask disagrees with the others' (Dice against the
rest far below the templates' median) is left out; the rest are averaged with their weights; the
structure's vote threshold (``threshold``, or one learned by leave-one-template-out on the
templates themselves, ``localizers.loto``) is mapped onto the segmenter's 0.5 cut.
Measured choices: docs/results.md, "Masks that follow the anatomy".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

#: stored template crops: int16 HU, this value where the template has no data
NO_DATA = np.int16(-32768)


@dataclass(frozen=True)
class RefineSettings:
    """Every number of the deformable refinement and the weighted fusion."""

    margin_mm: float = 15.0  # the crop reaches this far beyond the structure's box
    min_spacing_mm: float = 2.0  # the crop's voxels: the query's, coarsened to this where finer
    hu_range: tuple[float, float] = (-300.0, 700.0)
    smooth_mm: float = 1.0  # Gaussian on both images before demons (noise)
    iterations: int = 60
    field_sigma_mm: float = 1.5  # the displacement field's smoothing at each demons step
    similarity_hu: float = 120.0  # weight = exp(-local mean squared difference / (2 x this^2))
    similarity_window_mm: float = 4.0
    outlier_mad: float = 3.0  # left out: Dice to the others below median - this x MAD (x 1.48)
    threshold: float = 0.4  # the weighted vote that makes a voxel part of the structure
    # The threshold learned per structure by leave-one-template-out (loto.py; three templates or
    # more, from those whose mask of it is a label map) instead of ``threshold``.
    learn_thresholds: bool = True

    def key(self) -> dict:
        return asdict(self)


@dataclass
class CropGrid:
    """A grid in the query's axes: its voxel (i, j, k) -> LPS matrix and its [k, j, i] shape."""

    ijk_to_lps: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k (mm)."""
        return np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0)

    def positions(self) -> torch.Tensor:
        """LPS of every voxel centre, float64 [k, j, i, 3]."""
        k, j, i = (torch.arange(n, dtype=torch.float64) for n in self.shape)
        m = torch.as_tensor(self.ijk_to_lps, dtype=torch.float64)
        return (i[None, None, :, None] * m[:3, 0] + j[None, :, None, None] * m[:3, 1]
                + k[:, None, None, None] * m[:3, 2] + m[:3, 3])


def crop_grid(ijk_to_lps: np.ndarray, lo_ijk, hi_ijk, settings: RefineSettings, floor_ijk=0.0) -> CropGrid:
    """The refinement grid over the query block ``lo_ijk`` .. ``hi_ijk`` (inclusive) + the margin,
    on the query's axes, its voxels the query's coarsened to ``min_spacing_mm`` or to ``floor_ijk``
    (mm along i, j, k: the templates' own detail, finer than which nothing is there to match)."""
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    step = np.maximum(np.maximum(settings.min_spacing_mm, floor_ijk) / spacing, 1.0)  # query voxels per crop voxel
    margin = settings.margin_mm / spacing
    lo = np.asarray(lo_ijk, float) - margin
    hi = np.asarray(hi_ijk, float) + margin
    size = np.floor((hi - lo) / step).astype(int) + 1
    index = np.diag([*step, 1.0])
    index[:3, 3] = lo
    return CropGrid(ijk_to_lps @ index, (int(size[2]), int(size[1]), int(size[0])))


def sample(array: np.ndarray, ijk_to_lps: np.ndarray, lps: torch.Tensor, fill: float = 0.0,
           nearest: bool = False) -> torch.Tensor:
    """Trilinear (or nearest) samples of a [k, j, i] ``array`` at LPS positions ([..., 3]);
    ``fill`` outside it (trilinear: blended with ``fill`` within a voxel of its edge). Only the
    block the positions reach is converted to float."""
    ijk = transform_points(np.linalg.inv(ijk_to_lps), lps)
    flat = ijk.reshape(-1, 3)
    size = np.array(array.shape[::-1])
    lo = np.clip(np.floor(flat.min(0).values.numpy()).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(flat.max(0).values.numpy()).astype(int), 0, size - 1)
    block = torch.as_tensor(np.ascontiguousarray(array[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]),
                            dtype=torch.float32)
    # one voxel of ``fill`` around the block: beyond it the border (fill) is read, and no axis is
    # a single voxel (grid_sample would read that voxel at any position along it)
    block = F.pad(block, (1, 1, 1, 1, 1, 1), value=float(fill))
    local = (flat - torch.as_tensor(lo - 1, dtype=torch.float64)).float()
    extent = torch.tensor(block.shape[::-1], dtype=torch.float32)
    grid = 2.0 * local / (extent - 1) - 1.0  # align_corners=True: the first and last centres at -1, +1
    out = F.grid_sample(block[None, None], grid.view(1, -1, 1, 1, 3), mode="nearest" if nearest else "bilinear",
                        padding_mode="border", align_corners=True).view(-1)
    return out.view(lps.shape[:-1])


def transform_points(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """A (4, 4) affine applied to points [..., 3] (torch, float64)."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    return points.double() @ m[:3, :3].T + m[:3, 3]


def demons_image(array: np.ndarray, spacing_ijk, settings: RefineSettings) -> sitk.Image:
    """A crop as demons reads it: float32, the crop's spacing, smoothed by ``smooth_mm``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing([float(s) for s in spacing_ijk])
    return sitk.SmoothingRecursiveGaussian(img, settings.smooth_mm) if settings.smooth_mm > 0 else img


def demons(fixed: np.ndarray | sitk.Image, moving: np.ndarray, spacing_ijk, settings: RefineSettings) -> np.ndarray:
    """Displacement field [k, j, i, 3] (crop voxels, along i, j, k) with moving(x + u(x)) ~ fixed(x):
    fast symmetric-forces demons, the field smoothed at each step. ``fixed`` may be given as its
    :func:`demons_image` (made once for several moving images)."""
    if not isinstance(fixed, sitk.Image):
        fixed = demons_image(fixed, spacing_ijk, settings)
    f = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    f.SetNumberOfIterations(settings.iterations)
    f.SetStandardDeviations(settings.field_sigma_mm)
    f.SetSmoothDisplacementField(True)
    field = sitk.GetArrayFromImage(f.Execute(fixed, demons_image(moving, spacing_ijk, settings)))  # mm along i, j, k
    return field / np.asarray(spacing_ijk, float)


def similarity_weight(fixed: np.ndarray, warped: np.ndarray, both_valid: np.ndarray, spacing_ijk,
                      settings: RefineSettings) -> np.ndarray:
    """Per voxel, exp(-(locally averaged squared difference) / (2 similarity_hu^2)); voxels
    without data in both scans count as a perfect match (they tell nothing apart)."""
    sigma = settings.similarity_window_mm / np.asarray(spacing_ijk, float)[::-1]
    diff2 = np.where(both_valid, (fixed - warped) ** 2, 0.0).astype(np.float32)
    local = ndimage.gaussian_filter(diff2, sigma) / np.maximum(ndimage.gaussian_filter(
        both_valid.astype(np.float32), sigma), 1e-3)
    return np.exp(-local / (2.0 * settings.similarity_hu ** 2)).astype(np.float32)


def interpolate_field(field: np.ndarray, crop_ijk: torch.Tensor) -> torch.Tensor:
    """A [k, j, i, C] field sampled trilinearly at crop voxel positions [..., 3] (i, j, k); edge
    values beyond the crop."""
    shape = torch.tensor(field.shape[:3][::-1], dtype=torch.float32)
    grid = 2.0 * crop_ijk.float() / torch.clamp(shape - 1, min=1) - 1.0
    data = torch.as_tensor(np.moveaxis(field, -1, 0).copy(), dtype=torch.float32)[None]
    out = F.grid_sample(data, grid.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(field.shape[-1], -1).T.reshape(*crop_ijk.shape[:-1], field.shape[-1])


def leave_out_outliers(masks: list[np.ndarray], outlier_mad: float) -> list[int]:
    """Indices of the masks kept: each mask's Dice against the mean of the others; a mask far below
    the median (``outlier_mad`` scaled MADs, at least 0.1 Dice) is left out. Two or fewer: all kept."""
    n = len(masks)
    if n <= 2:
        return list(range(n))
    binary = [m > 0.5 for m in masks]
    total = np.sum([m.astype(np.float32) for m in masks], axis=0)
    dice = []
    for t in range(n):
        rest = (total - masks[t]) / (n - 1) > 0.5
        denom = binary[t].sum() + rest.sum()
        dice.append(2.0 * np.logical_and(binary[t], rest).sum() / denom if denom else 1.0)
    dice = np.array(dice)
    med = float(np.median(dice))
    spread = max(1.4826 * float(np.median(np.abs(dice - med))), 0.1 / max(outlier_mad, 1e-6))
    return [t for t in range(n) if dice[t] >= med - outlier_mad * spread]


def fuse(masks: list[np.ndarray], weights: list[np.ndarray], threshold: float) -> np.ndarray:
    """The weighted vote of the masks, mapped so that ``threshold`` becomes 0.5 (the segmenter's
    cut) and 0 / 1 stay 0 / 1: the prior blends with SAM as a probability would."""
    w = np.stack(weights)
    vote = (w * np.stack(masks)).sum(0) / np.maximum(w.sum(0), 1e-6)
    t = float(np.clip(threshold, 1e-3, 1 - 1e-3))
    return np.where(vote < t, 0.5 * vote / t, 0.5 + 0.5 * (vote - t) / (1 - t)).astype(np.float32)
