"""Landmark search: find the templates' extreme points in a query CT.

1. Templates: every extreme point (WPL: six per structure; SPL: six per sub-part) becomes a
   64^3 patch on the template's canonical grid. Its latent position is averaged over templates,
   and the centre of its decoder features (24 mm across, every scale) becomes a similarity
   template, averaged over templates.
2. Query, preprocessed once: start patches inside the body near its centre give a latent and a
   position; ``r * tanh(support - query) + position`` predicts every point (UAM step 1). A second
   UAM step re-predicts each point from a patch centred on its first prediction.
3. MSS refinement: a patch centred on each prediction is correlated with that point's templates
   at every scale; the argmax of the summed mean-cosine maps inside the search window moves the
   point. A second, narrower pass re-centres the patch on the match and looks again.

All points of all structures go through the network in batches. Internally points are
continuous canonical array coordinates ``(a0, a1, a2)`` = (S, A, L) voxels; results are
returned in LPS mm and in the query's original ijk voxels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..geometry import (POINT_NAMES, Geometry, box_from_extreme_points, box_from_points, box_lps_to_ijk,
                        canonical_geometry, point_axis)
from ..io import Volume
from ..preprocess import medlam_intensity, resample
from ..results import StructureResult
from ..templates import Template, extreme_points_of_cloud
from .checkpoint import FRAME
from .network import MedLAM

PATCH = 64
HALF = PATCH // 2
TEMPLATE_VOXELS = 8  # similarity template: 8 full-resolution voxels = 24 mm across
BODY_VALUE = 0.1  # MedLAM intensity of about -600 HU
DISTANCE_RATIO = np.array(FRAME["distance_ratio_mm"])


@dataclass
class SearchOptions:
    mode: str = "wpl"  # "wpl": one box per structure; "spl": one box per sub-part
    spl_interval_mm: float = 6.0  # sub-part height (reference default: 2 voxels of 3 mm)
    spl_max_parts: int = 6
    start_patches: int = 10
    uam_steps: int = 2
    search_radius: int = 16  # MSS window, canonical voxels either side (48 mm)
    fine_radius: int = 6  # second MSS pass, centred on the first match (its patch sees more context)
    mss_passes: int = 2
    # A structure whose best template match is weaker than this (mean cosine over scales) is
    # reported absent. Calibrated on a handful of head-and-neck cases with the shipped lite
    # checkpoint (present: 0.78-0.94; cropped out of the field of view: 0.58-0.65).
    min_similarity: float = 0.7
    batch_size: int = 8
    seed: int = 2023


@dataclass
class PreparedVolume:
    """A CT on the canonical grid, as MedLAM input, padded so any patch can be cut by slicing."""

    volume: Volume  # the original (HU, original grid)
    canon: Geometry
    padded: torch.Tensor  # [D+64, H+64, W+64] float32, air-padded

    @property
    def shape(self) -> np.ndarray:
        return np.array(self.padded.shape) - PATCH

    def patches(self, centres: np.ndarray) -> torch.Tensor:
        """[N, 1, 64, 64, 64] patches centred on integer array coords (clamped into the grid)."""
        c = np.clip(np.rint(centres).astype(int), 0, self.shape - 1)
        out = [self.padded[a:a + PATCH, b:b + PATCH, d:d + PATCH] for a, b, d in c]
        return torch.stack(out)[:, None]

    def to_lps(self, array_coords: np.ndarray) -> np.ndarray:
        return self.canon.ijk_to_lps(np.asarray(array_coords)[..., ::-1])

    def from_lps(self, lps: np.ndarray) -> np.ndarray:
        return self.canon.lps_to_ijk(lps)[..., ::-1]


def prepare(volume: Volume, device: torch.device | str = "cpu") -> PreparedVolume:
    canon = canonical_geometry(volume.geometry, FRAME["spacing_mm"])
    arr = medlam_intensity(resample(volume, canon, linear=True).array)
    padded = np.pad(arr, HALF, mode="constant", constant_values=0.0)
    return PreparedVolume(volume, canon, torch.from_numpy(padded).to(device))


@dataclass
class SupportSet:
    """Averaged template latents and similarity kernels for every (structure, part, point)."""

    keys: list[tuple[str, int, int]]  # (structure, part, point index in POINT_NAMES)
    latents: np.ndarray  # [T, 3]
    kernels: list[torch.Tensor]  # per scale [T, C, k, k, k]
    residuals: np.ndarray  # [T, 3] point - patch centre (sub-voxel part lost by integer patches)
    parts: dict[str, int]  # structure -> number of parts
    labels: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)

    def to(self, device) -> "SupportSet":
        return replace(self, kernels=[k.to(device) for k in self.kernels])


class LandmarkSearch:
    def __init__(self, model: MedLAM, device: torch.device | str = "cpu", options: SearchOptions | None = None):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.opts = options or SearchOptions()
        if self.opts.mode not in ("wpl", "spl"):
            raise InputError(f"unknown mode {self.opts.mode!r}; use wpl or spl")
        self.scales = model.config.feature_scales

    # -- network ---------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, prepared: PreparedVolume, centres: np.ndarray, features: bool):
        """Latents [N, 3] and (optionally) per-scale feature maps for patches at ``centres``."""
        lats, feats = [], [[] for _ in self.scales]
        amp = self.device.type == "cuda"
        for s in range(0, len(centres), self.opts.batch_size):
            x = prepared.patches(centres[s:s + self.opts.batch_size])
            with torch.autocast(self.device.type, enabled=amp, dtype=torch.float16):
                out = self.model(x, features=features, position=True)
            lats.append(out["position"].float().cpu().numpy())
            if features:
                for i, f in enumerate(out["features"]):
                    feats[i].append(f.float())
        lat = np.concatenate(lats) if lats else np.zeros((0, 3))
        return lat, ([torch.cat(f) for f in feats] if features else None)

    def _kernels(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for f, s in zip(feats, self.scales):
            d, k = PATCH // s, TEMPLATE_VOXELS // s
            lo = d // 2 - k // 2
            out.append(F.normalize(f[:, :, lo:lo + k, lo:lo + k, lo:lo + k], dim=1))
        return out

    # -- templates -------------------------------------------------------------------------
    def support(self, templates: list[Template], structures: list[str] | None = None,
                prepared: list[PreparedVolume] | None = None) -> SupportSet:
        if not templates:
            raise InputError("give at least one template")
        names = structures or list(templates[0].structures)
        for t in templates:
            t.require(names)
        if prepared is None:
            prepared = [prepare(t.load_image(), self.device) for t in templates]
        points, parts, notes = self._support_points(templates, names)
        keys = [k for k in points[0]]
        lat_sum, ker_sum, res_sum = None, None, 0.0
        for t_points, prep in zip(points, prepared):
            coords = prep.from_lps(np.array([t_points[k] for k in keys]))
            res_sum = res_sum + (coords - np.rint(coords))
            lat, feats = self._run(prep, coords, features=True)
            kers = self._kernels(feats)
            lat_sum = lat if lat_sum is None else lat_sum + lat
            ker_sum = kers if ker_sum is None else [a + b for a, b in zip(ker_sum, kers)]
        n = len(templates)
        return SupportSet(keys, lat_sum / n, [k / n for k in ker_sum], res_sum / n, parts,
                          {s: templates[0].structures[s].label for s in names}, notes)

    def _support_points(self, templates, names):
        """Per template: {(structure, part, point): LPS}, the part counts, and fallback notes."""
        parts = {s: 1 for s in names}
        notes: dict[str, str] = {}
        clouds = None
        if self.opts.mode == "spl":
            labels = [t.load_labels() for t in templates]
            if any(lab is None for lab in labels):
                notes.update({s: "SPL needs template label maps; used one box (WPL)" for s in names})
            else:
                clouds = [{s: _cloud(lab, t.structures[s].label) for s in names} for t, lab in zip(templates, labels)]
                for s in names:
                    extent = min(float(np.ptp(c[s][:, 2])) for c in clouds)
                    parts[s] = int(max(1, min(extent // self.opts.spl_interval_mm, self.opts.spl_max_parts)))
        out = []
        for n, t in enumerate(templates):
            pts = {}
            for s in names:
                if parts[s] == 1:
                    part_points = [t.structures[s].points]
                else:
                    part_points = _part_points(clouds[n][s], parts[s])
                for p, six in enumerate(part_points):
                    for i in range(6):
                        pts[(s, p, i)] = six[i]
            out.append(pts)
        return out, parts, notes

    # -- query -----------------------------------------------------------------------------
    def localize(self, query: PreparedVolume, support: SupportSet) -> dict:
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.opts.seed)
        starts = _start_points(query, self.opts.start_patches, rng)
        lat, _ = self._run(query, starts, features=False)
        q_lat, q_pos = lat.mean(0), starts.mean(0) * FRAME["spacing_mm"]
        pred = _uam(support.latents, q_lat, q_pos)  # array coords
        t_coarse = time.perf_counter()
        for _ in range(self.opts.uam_steps - 1):
            centres = np.clip(np.rint(pred), 0, query.shape - 1)
            lat, _ = self._run(query, centres, features=False)
            pred = _uam(support.latents, lat, centres * FRAME["spacing_mm"])
        t_uam = time.perf_counter()
        refined, score = self._refine(query, support, pred, self.opts.search_radius)
        for _ in range(self.opts.mss_passes - 1):
            refined, score = self._refine(query, support, refined, self.opts.fine_radius)
        t_mss = time.perf_counter()
        # Patches sit on whole voxels; the template point was this far off its patch centre.
        pred, refined = pred + support.residuals, refined + support.residuals
        result = self._assemble(query, support, pred, refined, score)
        result["timing_s"] = {"coarse": t_coarse - t0, "uam": t_uam - t_coarse, "mss": t_mss - t_uam,
                              "total": time.perf_counter() - t0}
        return result

    def _refine(self, query: PreparedVolume, support: SupportSet, pred: np.ndarray, r: int):
        """MSS: move each point to the best match of its templates within +-r voxels."""
        centres = np.clip(np.rint(pred), 0, query.shape - 1)
        refined = centres.astype(float).copy()
        score = np.zeros(len(centres))
        size = PATCH - TEMPLATE_VOXELS + 1  # positions 4 .. 60 of the patch
        for s in range(0, len(centres), self.opts.batch_size):
            sl = slice(s, s + self.opts.batch_size)
            _, feats = self._run(query, centres[sl], features=True)
            total = 0
            for f, ker, sc in zip(feats, support.kernels, self.scales):
                b, c = f.shape[:2]
                k = ker.shape[-1]
                q = F.normalize(f, dim=1).reshape(1, b * c, *f.shape[2:])
                sim = F.conv3d(q, ker[sl].to(q), groups=b)[0] / k ** 3
                total = total + F.interpolate(sim[None], size=(size,) * 3, mode="trilinear", align_corners=True)[0]
            total = total / len(self.scales)
            # output index j <-> patch voxel j + 4, i.e. offset j + 4 - 32 from the centre
            lo, hi = HALF - TEMPLATE_VOXELS // 2 - r, HALF - TEMPLATE_VOXELS // 2 + r + 1
            window = total[:, lo:hi, lo:hi, lo:hi].reshape(total.shape[0], -1)
            best, idx = window.max(dim=1)
            w = hi - lo
            idx = idx.cpu().numpy()
            offs = np.stack([idx // (w * w), (idx // w) % w, idx % w], 1) - r
            refined[sl] = centres[sl] + offs
            score[sl] = best.cpu().numpy()
        return refined, score

    def _assemble(self, query: PreparedVolume, support: SupportSet, pred, refined, score) -> dict:
        geom = query.volume.geometry
        extent = box_from_points(geom.corners_lps())
        pred_lps, ref_lps = query.to_lps(pred), query.to_lps(refined)
        index = {k: i for i, k in enumerate(support.keys)}
        out = {}
        for s, n_parts in support.parts.items():
            rows = [[index[(s, p, i)] for i in range(6)] for p in range(n_parts)]
            all_rows = [i for r in rows for i in r]
            sub_lps = [box_from_extreme_points(ref_lps[r], strict=False) for r in rows]
            coarse_box = box_from_points(pred_lps[all_rows])
            inside = bool(np.all(coarse_box[1] > extent[0]) and np.all(coarse_box[0] < extent[1]))
            drift = np.linalg.norm(pred_lps[all_rows] - ref_lps[all_rows], axis=1)
            agree = float(np.mean(np.exp(-drift / 15.0)))
            similarity = float(np.clip(np.mean(score[all_rows]), 0.0, 1.0))
            present = inside and similarity >= self.opts.min_similarity
            ordered = all(_consistent(ref_lps[r]) for r in rows)
            confidence = (np.clip((similarity - 0.5) / 0.5, 0.0, 1.0) * (0.5 + 0.5 * agree)
                          * (1.0 if ordered else 0.5)) if present else 0.0
            whole = np.stack([np.min([b[0] for b in sub_lps], 0), np.max([b[1] for b in sub_lps], 0)])
            whole = np.stack([np.maximum(whole[0], extent[0]), np.minimum(whole[1], extent[1])])
            whole[1] = np.maximum(whole[1], whole[0])
            out[s] = StructureResult(
                label=support.labels[s], present=present, confidence=round(float(confidence), 4),
                box_lps=whole.round(3).tolist(), box_ijk=box_lps_to_ijk(whole, geom).tolist(),
                sub_boxes_lps=[b.round(3).tolist() for b in sub_lps],
                sub_boxes_ijk=[box_lps_to_ijk(_clip_to(b, extent), geom).tolist() for b in sub_lps],
                extreme_points_lps=_whole_extremes(ref_lps, rows).round(3).tolist(),
                evidence={"similarity": round(similarity, 4), "uam_mss_agreement": round(agree, 4)},
                note=support.notes.get(s))
        return {"structures": out}


# --- helpers --------------------------------------------------------------------------------
def _uam(support_latents: np.ndarray, q_lat: np.ndarray, q_pos_mm: np.ndarray) -> np.ndarray:
    return (DISTANCE_RATIO * np.tanh(support_latents - q_lat) + q_pos_mm) / FRAME["spacing_mm"]


def _start_points(query: PreparedVolume, n: int, rng) -> np.ndarray:
    """Start patches inside the body, near its centre (never an endless search on air)."""
    arr = query.padded[HALF:-HALF, HALF:-HALF, HALF:-HALF].cpu().numpy()
    body = np.argwhere(arr[::2, ::2, ::2] >= BODY_VALUE) * 2
    if len(body) == 0:
        raise InputError("no body found in the image (is it empty or all air?)")
    centre = body.mean(0)
    dist = np.linalg.norm(body - centre, axis=1)
    near = body[dist <= max(10.0, np.sort(dist)[min(len(dist) - 1, 4 * n)])]
    return near[rng.choice(len(near), size=n, replace=len(near) < n)].astype(float)


def _cloud(labels: Volume, value: int) -> np.ndarray:
    kji = np.argwhere(labels.array == value)
    if len(kji) == 0:
        raise InputError(f"label {value} is absent from the template label map")
    return labels.geometry.ijk_to_lps(kji[:, ::-1].astype(float))


def _part_points(cloud: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """Split an LPS point cloud into ``n_parts`` equal slabs along head-foot, from inferior to
    superior; six extreme points per slab."""
    z = cloud[:, 2]
    edges = np.linspace(z.min(), z.max(), n_parts + 1)
    out = []
    for p in range(n_parts):
        lo, hi = edges[p], edges[p + 1]
        sel = cloud[(z >= lo - 1e-6) & ((z < hi) if p < n_parts - 1 else (z <= hi + 1e-6))]
        if len(sel) == 0:  # a gap in the structure: reuse the previous slab
            out.append(out[-1] if out else extreme_points_of_cloud(cloud, 1.0))
            continue
        out.append(extreme_points_of_cloud(sel, 1.0))
    return out


def _consistent(six: np.ndarray) -> bool:
    ok = True
    for i, name in enumerate(POINT_NAMES):
        axis, sign = point_axis(name)
        if sign > 0:
            partner = POINT_NAMES.index({"superior": "inferior", "left": "right", "posterior": "anterior"}[name])
            ok &= bool(six[i, axis] >= six[partner, axis])
    return ok


def _clip_to(box: np.ndarray, extent: np.ndarray) -> np.ndarray:
    lo = np.clip(box[0], extent[0], extent[1])
    hi = np.clip(box[1], extent[0], extent[1])
    return np.stack([lo, np.maximum(hi, lo)])


def _whole_extremes(lps: np.ndarray, rows: list[list[int]]) -> np.ndarray:
    """The structure's six points from its parts' points: the most extreme of each kind."""
    out = np.empty((6, 3))
    for i, name in enumerate(POINT_NAMES):
        axis, sign = point_axis(name)
        cands = lps[[r[i] for r in rows]]
        out[i] = cands[np.argmax(sign * cands[:, axis])]
    return out
