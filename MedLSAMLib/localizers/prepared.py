"""What a template contributes to the hybrid localizer, computed once and cached on disk.

Per template: the points and values the global alignment compares (inside a region around all
its structures), and per structure the points of its neighbourhood at about 2 mm, its centre and
its *shape*: the voxel centres of its label-map mask when the template has a label map, else its
six extreme points. Everything is plain numpy; the cache file is an ``.npz`` read without pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..geometry import box_from_points, box_lps_to_ijk, expand_box
from ..io import Volume
from ..weights import sha256
from ..point_masks import PointMaskSettings, mask_from_points
from ..templates import MANIFEST, Template
from .align import QueryImage
from .refine import NO_DATA, RefineSettings
from .working import SOFT_TISSUE_RANGE, WorkingSource, grid_points, working_image

import torch  # noqa: E402  (after the package imports: torch is the slow one)


@dataclass(frozen=True)
class HybridSettings:
    """Every number the hybrid localizer uses; part of the template cache key."""

    # Global stage: the template region around its structures, aligned to the whole query.
    roi_margin_mm: float = 50.0
    global_spacing_mm: float = 4.0
    global_points: int = 10000
    search_points: int = 3000  # first, translation-only search on an 8 mm smoothed image
    search_step_mm: float = 15.0  # head-foot start positions tried over the query's extent
    search_keep: int = 3
    block_mm: float = 40.0  # blockwise NCC (see align.block_ncc)
    global_iterations: int = 80
    global_max_scale: float = 0.15
    global_ignore_outside: bool = False  # True stretched maps on this data set (docs/results.md)
    # A query shorter than the templates (a neck slab, a head-only scan): the head-foot search
    # also tries placing each template's centre beyond the query's ends (by up to half the
    # template region's height), and the global affine leaves out the template points that the
    # chosen start puts outside the query's data, instead of reading them as air (which pulls the
    # template into the short scan). See docs/localizer.md and benchmarks/field_of_view.py.
    search_beyond_fov: bool = True
    global_static_outside: bool = True
    # Local stage: each structure's neighbourhood, one affine per template x structure.
    local_spacing_mm: float = 2.0
    local_margin_mm: float = 20.0
    local_points: int = 4000
    local_sigma_mm: float = 1.0
    local_hu_range: tuple[float, float] = SOFT_TISSUE_RANGE
    local_iterations: int = 80
    local_max_scale: float = 0.35
    # The query block the local stage works on reaches this far beyond the globally mapped
    # structure neighbourhoods (the local affines move them by far less).
    local_block_margin_mm: float = 40.0
    # The query's local image is made no finer than this fraction of the templates' own local
    # spacing (per L, P, S axis; the finest template decides): finer query detail has nothing to
    # match in the templates and costs time on a 512 x 512 scan (docs/results.md, "Seconds per
    # case against scan size"). A query within 10 % of the templates' detail is used as it is.
    # 0: the query at local_spacing_mm whatever the templates.
    local_detail_fraction: float = 0.9
    local_final_lr: float = 0.1  # cosine decay of the local step sizes: +0.6 IoU points on dev (docs)
    realign_outliers: bool = True  # a template left out of the consensus gets a second start
    # A structure longer than 1.5 x this (head-foot, mm) is also aligned in parts of about this
    # length, each with its own local affine: one affine cannot follow a long structure's
    # curvature (a spinal cord through a neck flexed differently). 0: off. 60 mm: the spinal
    # cord in 3-4 parts; better on the tuning set and on dev with five template sets (docs/localizer.md).
    part_length_mm: float = 60.0
    shape_points: int = 4000  # mask voxels kept per structure (a uniform subsample)
    # A structure face within this many voxels of the end of the template's data is "open": the
    # scan cut the structure there (a spinal cord contoured to the last slice), so the template
    # cannot say where it ends. See fusion.extend_open_faces.
    open_face_voxels: float = 2.5
    # A structure without a label-map mask gets one made from its six points on the template's
    # own CT (point_masks), carried onto each scan like a label map's (six-point templates: 34 ->
    # 60 % Dice on dev, docs/results.md). None: its shape stays the six points (no prior for it).
    point_masks: PointMaskSettings | None = field(default_factory=PointMaskSettings)
    # Each carried mask refined by a deformable registration around its structure and the
    # templates fused with weights (refine.py). None: the affinely carried masks, averaged.
    refine: RefineSettings | None = field(default_factory=RefineSettings)
    seed: int = 2023

    def key(self) -> dict:
        return asdict(self)


@dataclass
class PreparedStructure:
    centre: np.ndarray  # (3,) LPS, centre of the structure's extent (the local affine's centre)
    points: np.ndarray  # (N, 3) neighbourhood points
    values: np.ndarray  # (N,) template working values at them
    weights: np.ndarray  # (N,) their validity (0 on the template's padding)
    shape: np.ndarray  # (M, 3) LPS points whose bounding box is the structure (mask voxels or 6 points)
    from_mask: bool
    open_faces: np.ndarray  # (2, 3) bool, per box face: the template's data ends there (cut by the scan)
    # The label-map mask around the structure (uint8 [k, j, i], empty without a label map) and
    # its voxel -> LPS matrix: what the shape prior samples (hybrid.HybridLocalizer.shape_priors).
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.uint8))
    mask_ijk_to_lps: np.ndarray = field(default_factory=lambda: np.eye(4))
    # The template's CT around the structure (int16 HU, refine.NO_DATA where it has none) and its
    # voxel -> LPS matrix: what the deformable refinement registers (refine.py).
    image: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.int16))
    image_ijk_to_lps: np.ndarray = field(default_factory=lambda: np.eye(4))
    from_points: bool = False  # the mask was made from the six points (no label map for it)


@dataclass
class PreparedTemplate:
    name: str
    global_points: np.ndarray  # (G, 3)
    global_values: np.ndarray  # (G,) at global_spacing smoothing
    search_values: np.ndarray  # (G,) at 8 mm smoothing
    centroid: np.ndarray  # (3,) body centroid of the region
    structures: dict[str, PreparedStructure] = field(default_factory=dict)
    # Long structures' head-foot parts (HybridSettings.part_length_mm), inferior to superior;
    # each part's shape is its slab of the structure's shape.
    parts: dict[str, list[PreparedStructure]] = field(default_factory=dict)
    # Spacing of the template's local working image along L, P, S (mm): the detail it can match.
    detail_lps: np.ndarray = field(default_factory=lambda: np.zeros(3))


def _values_at(working, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and validity of a working image (see working.working_image) at LPS points."""
    array, valid, geometry = working
    image = QueryImage.from_array(array, geometry, validity_kji=valid)
    vals, ok = image.sample(torch.as_tensor(points, dtype=torch.float32)[None])
    return vals[0].numpy(), ok[0].numpy()


def _block_cloud(mask: np.ndarray, ijk_to_lps: np.ndarray) -> np.ndarray:
    """LPS centres of a block mask's voxels."""
    kji = np.argwhere(mask)
    return (np.hstack([kji[:, ::-1], np.ones((len(kji), 1))]) @ ijk_to_lps.T)[:, :3]


def mask_crop(labels: Volume, value: int, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 mask of ``value`` in its bounding block + ``margin`` voxels, that block's ijk -> LPS matrix)."""
    kji = np.argwhere(labels.array == value)
    lo = np.maximum(kji.min(0) - margin, 0)
    hi = np.minimum(kji.max(0) + margin, np.array(labels.array.shape) - 1)
    block = (labels.array[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] == value).astype(np.uint8)
    matrix = labels.geometry.ijk_to_lps_matrix.copy()
    matrix[:3, 3] = labels.geometry.ijk_to_lps(lo[::-1].astype(float))
    return block, matrix


def image_crop(image: Volume, pad: float | None, box_lps: np.ndarray, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU of the image's voxels over ``box_lps`` + ``margin_mm``, NO_DATA where the image
    holds padding; that block's ijk -> LPS matrix)."""
    g = image.geometry
    lo, hi = box_lps_to_ijk(expand_box(box_lps, margin_mm), g)
    block = image.array[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    crop = np.clip(np.rint(block), -1024, 4000).astype(np.int16)
    if pad is not None:
        crop[block == pad] = NO_DATA
    matrix = g.ijk_to_lps_matrix.copy()
    matrix[:3, 3] = g.ijk_to_lps(lo.astype(float))
    return crop, matrix


def prepare_template(template: Template, names: list[str], settings: HybridSettings) -> PreparedTemplate:
    rng = np.random.default_rng(settings.seed)
    part_rng = np.random.default_rng(settings.seed + 1)
    image = template.load_image()
    labels = template.load_labels()
    if labels is not None and not labels.geometry.is_close(image.geometry, atol=1e-3):
        labels = None  # a label map on another grid is not trusted for shapes; the points still are
    structures = template.require(names)
    fov = box_from_points(image.geometry.corners_lps())
    extents = [box_from_points(s.points) for s in structures]
    roi_lo = np.maximum(np.min([e[0] for e in extents], 0) - settings.roi_margin_mm, fov[0])
    roi_hi = np.minimum(np.max([e[1] for e in extents], 0) + settings.roi_margin_mm, fov[1])

    source = WorkingSource(image)
    coarse = working_image(source, settings.global_spacing_mm, settings.global_spacing_mm)
    search = working_image(source, 2 * settings.global_spacing_mm, 8.0)
    pts = grid_points(roi_lo, roi_hi, settings.global_spacing_mm)
    vals, valid = _values_at(coarse, pts)
    body = np.flatnonzero((vals > 100.0) & (valid > 0.5))  # tissue (and its blurred edge), not air or padding
    if len(body) < 100:
        raise InputError(f"template {template.name}: no body found around its structures (is the image empty?)")
    centroid = pts[body].mean(0)
    keep = body[rng.choice(len(body), settings.global_points, replace=len(body) < settings.global_points)]
    fine = working_image(source, settings.local_spacing_mm, settings.local_sigma_mm, settings.local_hu_range)
    prepared = PreparedTemplate(template.name, pts[keep], vals[keep], _values_at(search, pts[keep])[0], centroid,
                                detail_lps=fine[2].spacing_lps)
    data = source.data_box()
    tolerance = settings.open_face_voxels * image.geometry.spacing_lps
    for s, extent in zip(structures, extents):
        shape, from_mask = s.points, False
        crop = {}
        mask, from_points = None, False
        if labels is not None and np.any(labels.array == s.label):
            mask, matrix = mask_crop(labels, s.label)
        elif settings.point_masks is not None:
            mask, matrix = mask_from_points(image, s.points, settings.point_masks)
            from_points = True
        cloud = _block_cloud(mask, matrix) if mask is not None else np.zeros((0, 3))
        if len(cloud):
            crop = {"mask": mask, "mask_ijk_to_lps": matrix, "from_points": from_points}
            if settings.refine is not None:  # the crop reaches past the query's: the affines scale
                crop["image"], crop["image_ijk_to_lps"] = image_crop(image, source.pad, box_from_points(cloud),
                                                                     1.5 * settings.refine.margin_mm + 10.0)
            if len(cloud) > settings.shape_points:
                cloud = cloud[rng.choice(len(cloud), settings.shape_points, replace=False)]
            # The six points are on the mask too; keep them so the extent is exact.
            shape, from_mask = np.concatenate([cloud, s.points]), True
        box = box_from_points(shape)
        open_faces = np.abs(box - data) <= tolerance
        prepared.structures[s.name] = PreparedStructure(*_neighbourhood(box, fine, settings, rng), shape, from_mask,
                                                        open_faces, **crop)
        pieces = head_foot_parts(shape, settings.part_length_mm)
        if len(pieces) > 1:  # parts draw from their own generator: the structures' samples stay as they were
            prepared.parts[s.name] = [PreparedStructure(*_neighbourhood(box_from_points(piece), fine, settings, part_rng),
                                                        piece, from_mask, open_faces) for piece in pieces]
    return prepared


def _neighbourhood(box: np.ndarray, fine, settings: HybridSettings, rng):
    """(centre, points, values, validity) of the local stage around a box: points on the local
    grid over the box + the local margin, with the template's working values at them."""
    p = grid_points(box[0] - settings.local_margin_mm, box[1] + settings.local_margin_mm, settings.local_spacing_mm)
    p = p[rng.choice(len(p), settings.local_points, replace=len(p) < settings.local_points)]
    values, valid = _values_at(fine, p)
    return box.mean(0), p, values, valid


def head_foot_parts(shape: np.ndarray, length_mm: float) -> list[np.ndarray]:
    """A long head-foot structure cut into slabs of about ``length_mm``; none for a structure
    shorter than 1.5 x that or not elongated head-foot (at least twice as long as its width or
    its depth, whichever is smaller, as a bent tube: a spinal cord, not a mandible)."""
    if length_mm <= 0 or len(shape) == 0:
        return []
    size = np.ptp(shape, axis=0)
    extent = float(size[2])
    if extent < 1.5 * length_mm or extent < 2 * min(size[0], size[1]):
        return []
    z = shape[:, 2]
    edges = np.linspace(z.min(), z.max(), int(round(extent / length_mm)) + 1)
    index = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, len(edges) - 2)
    return [shape[index == k] for k in range(len(edges) - 1) if np.any(index == k)]


# --- disk cache ------------------------------------------------------------------------------
CACHE_FORMAT = 10  # bump when PreparedTemplate or the working images change
def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDLSAM_CACHE") or Path.home() / ".cache" / "medlsam") / "templates"


def cache_key(template: Template, names: list[str], settings: HybridSettings) -> str:
    """SHA256 over the template's files (manifest, markups, image, labels), the names, the settings
    and the MedLSAM version: any change to any of them gives another key."""
    d = template.directory
    files = [d / MANIFEST] + sorted(p for p in d.glob("*.mrk.json")) if d else []
    files += [template.image_path] + ([template.labels_path] if template.labels_path else [])
    parts = {"version": __version__, "format": CACHE_FORMAT, "names": list(names), "settings": settings.key(),
             "files": [[Path(f).name, sha256(f)] for f in files if Path(f).is_file()]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_PART_ARRAYS = ("centre", "points", "values", "weights", "shape")  # what a part adds to its structure


def save_prepared(prepared: PreparedTemplate, path: Path) -> None:
    arrays = {"global_points": prepared.global_points, "global_values": prepared.global_values,
              "search_values": prepared.search_values, "centroid": prepared.centroid,
              "detail_lps": prepared.detail_lps}
    names = list(prepared.structures)
    for n, name in enumerate(names):
        s = prepared.structures[name]
        arrays.update({f"s{n}_centre": s.centre, f"s{n}_points": s.points, f"s{n}_values": s.values,
                       f"s{n}_weights": s.weights,
                       f"s{n}_shape": s.shape, f"s{n}_from_mask": np.array(s.from_mask),
                       f"s{n}_open_faces": s.open_faces, f"s{n}_mask": s.mask,
                       f"s{n}_mask_ijk_to_lps": s.mask_ijk_to_lps, f"s{n}_image": s.image,
                       f"s{n}_image_ijk_to_lps": s.image_ijk_to_lps, f"s{n}_from_points": np.array(s.from_points)})
    parts = {name: len(prepared.parts.get(name, [])) for name in names}
    for n, name in enumerate(names):
        for k, part in enumerate(prepared.parts.get(name, [])):
            arrays.update({f"s{n}p{k}_{key}": getattr(part, key) for key in _PART_ARRAYS})
    arrays["meta"] = np.array(json.dumps({"name": prepared.name, "structures": names, "parts": parts}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_prepared(path: Path) -> PreparedTemplate:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        prepared = PreparedTemplate(meta["name"], z["global_points"], z["global_values"], z["search_values"],
                                    z["centroid"], detail_lps=z["detail_lps"])
        for n, name in enumerate(meta["structures"]):
            prepared.structures[name] = PreparedStructure(z[f"s{n}_centre"], z[f"s{n}_points"], z[f"s{n}_values"],
                                                          z[f"s{n}_weights"], z[f"s{n}_shape"],
                                                          bool(z[f"s{n}_from_mask"]), z[f"s{n}_open_faces"],
                                                          z[f"s{n}_mask"], z[f"s{n}_mask_ijk_to_lps"],
                                                          z[f"s{n}_image"], z[f"s{n}_image_ijk_to_lps"],
                                                          bool(z[f"s{n}_from_points"]))
            count = meta["parts"][name]
            if count:
                prepared.parts[name] = [
                    PreparedStructure(*(z[f"s{n}p{k}_{key}"] for key in _PART_ARRAYS),
                                      from_mask=prepared.structures[name].from_mask,
                                      open_faces=prepared.structures[name].open_faces) for k in range(count)]
    return prepared


def prepare_cached(template: Template, names: list[str], settings: HybridSettings,
                   cache_dir: Path | None) -> tuple[PreparedTemplate, bool]:
    """(prepared template, whether it came from the cache). ``cache_dir=None`` disables the cache."""
    if cache_dir is None:
        return prepare_template(template, names, settings), False
    path = Path(cache_dir) / f"{cache_key(template, names, settings)}.npz"
    if path.is_file():
        try:
            return load_prepared(path), True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt, never trusted
    prepared = prepare_template(template, names, settings)
    try:
        save_prepared(prepared, path)
    except OSError:
        pass  # a read-only cache folder only costs time
    return prepared, False
