"""Segment a CT slice by slice inside per-structure 2D boxes, with one embedding per slice.

Slices run along the input's axial axis (the voxel axis closest to head-foot). Each slice is
windowed, embedded once, and every structure box on it is decoded in one batch. Probabilities
are kept only inside each structure's box region (float16), so memory stays bounded by the CT
itself plus one label map, whatever the number of structures.

With ``slice_step`` k > 1 only the *key slices* are encoded: every k-th slice (one grid for the
whole volume) in each structure's range plus its first, middle and last slice; the union over
structures, so a slice is encoded once whatever the number of structures on it, and decoded for
all of them. The
slices between two key slices of a structure get its mask by shape-based interpolation: the
signed distance maps (mm) of the two decoded masks blended linearly, the zero level kept, inside
the slice's own box. The encoder is the expensive part; the curve of Dice against k is in
docs/results.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..geometry import Geometry, slice_boxes
from ..io import Volume
from ..preprocess import SAM_WINDOW, window_to_uint8


@dataclass
class SegmentOptions:
    # Slices per encoder call; 0 = 4 on CUDA, 1 on CPU (on CPU a batch is slower per slice than
    # single slices: docs/results.md).
    batch_slices: int = 0
    margin_px_at_1024: float = 10.0
    largest_component: bool = True
    fill_holes: bool = True
    resolve_overlaps: bool = True  # a voxel claimed by two structures goes to the more probable one
    threshold: float = 0.5
    # Each slice is cropped to a square around the union of its boxes (side: 1.5 x the union, at
    # least 3/8 of the slice) before resizing to the model input, so small structures are not a
    # few pixels wide. crop_context=0 feeds whole slices, as the paper does.
    crop_context: float = 1.5
    min_crop_fraction: float = 0.375
    # Encode every k-th slice of a structure (and its first, middle and last); interpolate between.
    slice_step: int = 4
    # "shape": one box per slice from the structure's localized shape (the localizer's
    # slice_boxes_ijk) where it has one; "box": every slice gets the footprint of the 3D box
    # (or of its SPL sub-boxes). See docs/results.md.
    prompt: str = "shape"
    # Weight of the localizer's shape prior (the templates' masks carried onto the scan) in the
    # mask probability: (1 - w) x SAM + w x prior; 0 = SAM alone, 1 = the prior alone (no encoder
    # call at all). Measured on the dev set: docs/results.md.
    prior_weight: float = 1.0


@dataclass
class StructureRequest:
    name: str
    label: int
    boxes_ijk: list  # inclusive ijk boxes (one per sub-part, or one per slice)
    window: tuple[float, float] = SAM_WINDOW
    prior: tuple | None = None  # (offset_kji, probability [k, j, i]) from the localizer, or None


class _Region:
    """A structure's probabilities inside its [slice, v, u] bounding block."""

    def __init__(self, boxes2d: dict[int, tuple[int, int, int, int]]):
        s = np.array(sorted(boxes2d))
        b = np.array([boxes2d[k] for k in s])
        self.boxes = boxes2d
        self.s0, self.s1 = int(s.min()), int(s.max())
        self.u0, self.v0 = int(b[:, 0].min()), int(b[:, 1].min())
        self.u1, self.v1 = int(b[:, 2].max()), int(b[:, 3].max())
        self.prob = np.zeros((self.s1 - self.s0 + 1, self.v1 - self.v0 + 1, self.u1 - self.u0 + 1), np.float16)
        self.decoded: set[int] = set()

    def put(self, s: int, box, prob2d: np.ndarray, row0: int = 0, col0: int = 0) -> None:
        """Store ``prob2d`` (a crop whose top-left pixel is (row0, col0)) inside ``box``."""
        u0, v0, u1, v1 = box
        self.prob[s - self.s0, v0 - self.v0:v1 - self.v0 + 1, u0 - self.u0:u1 - self.u0 + 1] = \
            prob2d[v0 - row0:v1 - row0 + 1, u0 - col0:u1 - col0 + 1]
        self.decoded.add(s)

    def interpolate(self, threshold: float, pixel_mm: tuple[float, float]) -> int:
        """Fill every slice between two decoded ones by signed-distance interpolation of their
        masks; returns the number of slices filled. ``pixel_mm``: (row, column) spacing."""
        keys = sorted(self.decoded)
        sdf = {k: signed_distance(self.prob[k - self.s0] > threshold, pixel_mm) for k in keys}
        filled = 0
        for a, b in zip(keys[:-1], keys[1:]):
            for s in range(a + 1, b):
                t = (s - a) / (b - a)
                d = (1 - t) * sdf[a] + t * sdf[b]
                inside = np.zeros(d.shape, bool)
                u0, v0, u1, v1 = self.boxes[s]
                inside[v0 - self.v0:v1 - self.v0 + 1, u0 - self.u0:u1 - self.u0 + 1] = True
                # A probability-like value (0.5 on the interpolated contour) for the overlap rule.
                self.prob[s - self.s0] = np.where(inside, 1.0 / (1.0 + np.exp(np.clip(d, -30, 30))), 0.0)
                filled += 1
        return filled

    def blend_prior(self, prior: tuple, weight: float, ax: int, u_ax: int, v_ax: int) -> None:
        """prob = (1 - weight) x prob + weight x prior, the prior given as (offset_kji, [k, j, i] array)."""
        offset, array = prior
        lo_ijk = np.asarray(offset[::-1])
        hi_ijk = lo_ijk + np.asarray(array.shape[::-1]) - 1
        block_lo = {ax: self.s0, u_ax: self.u0, v_ax: self.v0}
        block_hi = {ax: self.s1, u_ax: self.u1, v_ax: self.v1}
        lo = [max(lo_ijk[a], block_lo[a]) for a in range(3)]
        hi = [min(hi_ijk[a], block_hi[a]) for a in range(3)]
        inside = np.zeros(self.prob.shape, np.float32)
        if all(lo[a] <= hi[a] for a in range(3)):
            src = array[tuple(slice(lo[a] - lo_ijk[a], hi[a] - lo_ijk[a] + 1) for a in (2, 1, 0))]
            src = np.moveaxis(src, [2 - ax, 2 - v_ax, 2 - u_ax], [0, 1, 2])  # -> [slice, v, u]
            inside[lo[ax] - self.s0:hi[ax] - self.s0 + 1, lo[v_ax] - self.v0:hi[v_ax] - self.v0 + 1,
                   lo[u_ax] - self.u0:hi[u_ax] - self.u0 + 1] = src
        self.prob = ((1.0 - weight) * self.prob.astype(np.float32) + weight * inside).astype(np.float16)


def signed_distance(mask: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Signed distance (mm) to a 2D mask's boundary: negative inside, positive outside. An empty
    mask is "far outside" everywhere (the block's diagonal), so a shape shrinks towards it."""
    if not mask.any():
        return np.full(mask.shape, float(np.hypot(*(np.array(mask.shape) * pixel_mm))), np.float32)
    if mask.all():
        return np.full(mask.shape, -float(np.hypot(*(np.array(mask.shape) * pixel_mm))), np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=pixel_mm)
    inside = ndimage.distance_transform_edt(mask, sampling=pixel_mm)
    return (outside - inside).astype(np.float32)


def key_slices(first: int, last: int, step: int) -> set[int]:
    """Slices of ``first..last`` to encode: the multiples of ``step`` (one grid for all structures,
    so that structures on the same slices share their key slices), and the first, middle and last."""
    step = max(1, step)
    keys = set(range(-(-first // step) * step, last + 1, step))
    return keys | {first, (first + last) // 2, last}


def crop_window(boxes, shape: tuple[int, int], context: float, min_fraction: float) -> tuple[int, int, int, int]:
    """Square (row0, col0, row1, col1), inclusive, around the union of ``boxes``, inside the slice."""
    h, w = shape
    if context <= 0:
        return 0, 0, h - 1, w - 1
    b = np.asarray(boxes).reshape(-1, 4)
    u0, v0, u1, v1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    side = int(np.ceil(max(context * max(u1 - u0 + 1, v1 - v0 + 1), min_fraction * min(h, w))))
    side_r, side_c = min(side, h), min(side, w)
    r0 = int(np.clip((v0 + v1 + 1) // 2 - side_r // 2, 0, h - side_r))
    c0 = int(np.clip((u0 + u1 + 1) // 2 - side_c // 2, 0, w - side_c))
    return r0, c0, r0 + side_r - 1, c0 + side_c - 1


def axes(geometry: Geometry) -> tuple[int, int, int]:
    """(slice axis, u axis = columns, v axis = rows) as ijk axis numbers."""
    ax = geometry.axial_axis
    u_ax, v_ax = [a for a in range(3) if a != ax]
    return ax, u_ax, v_ax


def get_slice(array: np.ndarray, ax: int, s: int) -> np.ndarray:
    """2D slice ``s`` along ijk axis ``ax`` of a ``[k, j, i]`` array: rows = v axis, columns = u axis."""
    return np.take(array, s, axis=2 - ax)


def block_index(ax, u_ax, v_ax, s0, s1, v0, v1, u0, u1):
    idx = [slice(None)] * 3
    idx[2 - ax] = slice(s0, s1 + 1)
    idx[2 - v_ax] = slice(v0, v1 + 1)
    idx[2 - u_ax] = slice(u0, u1 + 1)
    return tuple(idx)


def to_volume_order(block: np.ndarray, ax, u_ax, v_ax) -> np.ndarray:
    """A [slice, v, u] block in ``[k, j, i]`` array order."""
    return np.moveaxis(block, [0, 1, 2], [2 - ax, 2 - v_ax, 2 - u_ax])


def segment_volume(volume: Volume, requests: list[StructureRequest], segmenter, options: SegmentOptions | None = None,
                   progress=None, use_cache: bool = True) -> tuple[np.ndarray, dict, dict]:
    """Label map (``[k, j, i]``; uint8, or uint16 when a label exceeds 255) plus per-structure stats
    and stage timings.

    ``use_cache=False`` recomputes the embedding for every structure on a slice, as the
    reference does; it exists for the speed benchmark only.
    """
    opts = options or SegmentOptions()
    geom = volume.geometry
    ax, u_ax, v_ax = axes(geom)
    timing = {"encode": 0.0, "decode": 0.0, "postprocess": 0.0}
    regions: dict[str, _Region] = {}
    work: dict[tuple, dict[int, list]] = {}  # window -> slice -> [(name, box)]
    keys: dict[tuple, set[int]] = {}  # window -> slices to encode
    for r in requests:
        boxes2d = slice_boxes(r.boxes_ijk, geom, opts.margin_px_at_1024)
        if not boxes2d:
            continue
        regions[r.name] = _Region(boxes2d)
        for s, box in boxes2d.items():
            work.setdefault(tuple(r.window), {}).setdefault(s, []).append((r.name, box))
        keys.setdefault(tuple(r.window), set()).update(key_slices(min(boxes2d), max(boxes2d), opts.slice_step))
    # An encoded slice is decoded for every structure on it: the crop (and so the embedding) of a
    # key slice is the same whatever the step, and decoding costs little next to encoding.
    work = {w: {s: on for s, on in per_slice.items() if s in keys[w]} for w, per_slice in work.items()}
    if opts.prior_weight >= 1.0:  # the prior alone: SAM only for structures that have none
        with_prior = {r.name for r in requests if r.prior is not None}
        work = {w: {s: kept for s, on in per_slice.items() if (kept := [e for e in on if e[0] not in with_prior])}
                for w, per_slice in work.items()}
    total = sum(len(v) for v in work.values())
    device = getattr(segmenter, "device", None)
    batch_size = opts.batch_slices or (4 if device is not None and torch.device(device).type == "cuda" else 1)
    done = 0
    if progress:
        progress(0, total)  # the total is known (and a cancel request can act) before the first slice
    for window, per_slice in work.items():
        order = sorted(per_slice)
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            images, crops = [], []
            for s in batch:
                full = get_slice(volume.array, ax, s)
                r0, c0, r1, c1 = crop_window([box for _, box in per_slice[s]], full.shape, opts.crop_context,
                                             opts.min_crop_fraction)
                images.append(window_to_uint8(full[r0:r1 + 1, c0:c1 + 1], window))
                crops.append((r0, c0))
            if use_cache:
                t = time.perf_counter()
                emb = segmenter.embed(images)
                timing["encode"] += time.perf_counter() - t
            for n, s in enumerate(batch):
                names = [name for name, _ in per_slice[s]]
                boxes = [box for _, box in per_slice[s]]
                r0, c0 = crops[n]
                shape = images[n].shape
                local = [(u0 - c0, v0 - r0, u1 - c0, v1 - r0) for u0, v0, u1, v1 in boxes]
                if use_cache:
                    t = time.perf_counter()
                    probs = segmenter.decode(emb[n], local, shape).cpu().numpy()
                    timing["decode"] += time.perf_counter() - t
                else:
                    probs = []
                    for box in local:  # one encoder pass per structure, as the reference
                        t = time.perf_counter()
                        e = segmenter.embed(images[n:n + 1])
                        timing["encode"] += time.perf_counter() - t
                        t = time.perf_counter()
                        probs.append(segmenter.decode(e[0], [box], shape).cpu().numpy()[0])
                        timing["decode"] += time.perf_counter() - t
                for name, box, p in zip(names, boxes, probs):
                    regions[name].put(s, box, p, r0, c0)
            done += len(batch)
            if progress:
                progress(done, total)

    t = time.perf_counter()
    spacing = np.asarray(geom.spacing, dtype=float)
    interpolated = sum(reg.interpolate(opts.threshold, (spacing[v_ax], spacing[u_ax])) for reg in regions.values())
    if opts.prior_weight > 0:
        for r in requests:
            if r.prior is not None and r.name in regions:
                regions[r.name].blend_prior(r.prior, opts.prior_weight, ax, u_ax, v_ax)
    timing["interpolate"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = np.zeros(volume.array.shape, np.uint8 if max((r.label for r in requests), default=0) < 256 else np.uint16)
    best = np.zeros(volume.array.shape, np.float16) if opts.resolve_overlaps and len(regions) > 1 else None
    stats, blocks = {}, {}
    by_name = {r.name: r for r in requests}
    for name, reg in regions.items():
        mask = reg.prob > opts.threshold
        if opts.fill_holes:
            for s in range(mask.shape[0]):
                mask[s] = ndimage.binary_fill_holes(mask[s])
        if opts.largest_component and mask.any():
            lab, n = ndimage.label(mask)
            if n > 1:
                sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
                mask = lab == (1 + int(np.argmax(sizes)))
        idx = blocks[name] = block_index(ax, u_ax, v_ax, reg.s0, reg.s1, reg.v0, reg.v1, reg.u0, reg.u1)
        mask_v = to_volume_order(mask, ax, u_ax, v_ax)
        if best is not None:
            prob_v = to_volume_order(reg.prob, ax, u_ax, v_ax)
            win = mask_v & (prob_v > best[idx])
            best[idx][win] = prob_v[win]
            labels[idx][win] = by_name[name].label
        else:
            labels[idx][mask_v] = by_name[name].label
        stats[name] = {"slices": int(reg.s1 - reg.s0 + 1), "voxels_before_overlap": int(mask.sum())}
    for name in stats:  # a structure's voxels lie in its block: counted there, not over the scan
        stats[name]["voxels"] = int((labels[blocks[name]] == by_name[name].label).sum())
    timing["postprocess"] = time.perf_counter() - t
    timing["slices"] = total  # slices encoded
    timing["interpolated_slices"] = interpolated
    return labels, stats, timing
