"""The hybrid localizer: coarse-to-fine template alignment, all templates and structures batched.

1. **Global**: each template's region around its structures is placed on the query. A
   translation-only search over head-foot start positions (8 mm smoothing) picks a start, then
   one affine per template is fitted with blockwise NCC at 4 mm (all templates in one batch).
2. **Local**: per template x structure, the structure's neighbourhood (its extent + 20 mm, 2 mm
   points) gets its own affine correction on top of the global one; a long head-foot structure
   (a spinal cord) also gets one per part of about 60 mm, which map its shape piece by piece
   (all pairs and parts in one batch).
3. **Fusion**: each pair maps the template's structure shape (mask voxels, or its six points)
   into the query. A template whose boxes disagree with the consensus of all templates is left
   out (its alignment failed, or it shows another body region); the others' boxes of what the
   query's data shows of their shapes are fused per face (trimmed mean, or median for fewer
   than four).
4. **Shape**: the voting template whose box is closest to the fused one lends its mapped shape,
   fitted into the fused box: sub-part boxes (SPL) and one box per axial slice come from it.

Presence: a structure whose fused box lies mostly outside the query's field of view is
reported ``present: false``. Why this design and what each stage gains: docs/localizer.md.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..geometry import Geometry, box_from_points, box_iou, box_lps_to_ijk
from ..io import Volume, read_ct
from ..results import Localization, StructureResult
from ..templates import extreme_points_of_cloud, load_template_set
from .align import AlignSettings, PointSets, QueryImage, align, apply_affine, weighted_ncc
from .fusion import (FusedBox, FusionSettings, agreement_in_data, confidence, consensus_templates,
                     extend_open_faces, fit_shape, fuse_boxes, inside_fraction, shown_fraction, visible_box,
                     visible_part)
from . import refine
from . import loto
from .prepared import HybridSettings, PreparedTemplate, cache_key, default_cache_dir, prepare_cached
from .working import HU_RANGE, WorkingSource, working_image

SPL_INTERVAL_MM = 6.0  # sub-part height, as MedLAM's SPL
SPL_MAX_PARTS = 6


def _tensor(a, device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)


class HybridLocalizer:
    """Templates prepared once (from the disk cache when possible); localizes any number of CTs."""

    kind = "hybrid"
    gives_priors = True  # localize(..., priors=True): see shape_priors

    def __init__(self, template_dirs, *, mode: str = "wpl", device: str | torch.device = "cpu",
                 structures: list[str] | None = None, settings: HybridSettings | None = None,
                 fusion: FusionSettings | None = None, cache_dir: Path | str | None | bool = True):
        t0 = time.perf_counter()
        if mode not in ("wpl", "spl"):
            raise InputError(f"unknown mode {mode!r}; use wpl or spl")
        self.mode = mode
        self.device = torch.device(device)
        self.settings = settings or HybridSettings()
        self.fusion = fusion or FusionSettings()
        self.templates, self.structures = load_template_set(template_dirs, structures)
        cache = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
        self.cache_dir = cache
        loaded = [prepare_cached(t, self.structures, self.settings, cache) for t in self.templates]
        self.prepared: list[PreparedTemplate] = [p for p, _ in loaded]
        self.cache_hits = sum(hit for _, hit in loaded)
        # per structure, the vote threshold of the fused masks (refine.fuse); the settings' default
        # for any structure not named. Learned at the first query that asks for masks (a localizer
        # that only gives boxes never pays for it), or by calling learn_thresholds.
        self.thresholds: dict[str, float] = {}
        self.learned: dict | None = None  # what leave-one-template-out taught (loto.py)
        self.setup_s = time.perf_counter() - t0

    def learn_thresholds(self) -> dict:
        """Per structure, the vote threshold learned by leave-one-template-out (loto.py: three
        templates or more, refinement on), from the cache when this set was learned before; once.
        Returns what was learned (thresholds and the Dice of each candidate)."""
        if self.learned is not None:
            return self.learned
        refine_settings = self.settings.refine
        if refine_settings is None or not refine_settings.learn_thresholds or len(self.prepared) < 3:
            self.learned = {"thresholds": {}, "dice_by_threshold": {}}
            return self.learned
        key = loto.learned_key([cache_key(t, self.structures, self.settings) for t in self.templates],
                               self.structures, self.settings.key())
        path = self.cache_dir / "learned" / f"{key}.json" if self.cache_dir else None
        found = loto.load_learned(path) if path is not None and path.is_file() else None
        if found is None:
            found = loto.learn_thresholds(self)
            if path is not None:
                try:
                    loto.save_learned(path, *found)
                except OSError:
                    pass  # a read-only cache folder only costs time
        self.thresholds = dict(found[0])
        self.learned = {"thresholds": self.thresholds, "dice_by_threshold": found[1]}
        return self.learned

    def describe(self) -> dict:
        return {"kind": self.kind, "settings": self.settings.key(),
                "template_cache": str(self.cache_dir) if self.cache_dir else None,
                **({"learned_thresholds": self.thresholds} if self.thresholds else {})}

    # -- query ---------------------------------------------------------------------------------
    def localize(self, image: str | Path | Volume, keep_stages: bool = False, priors: bool = False) -> Localization:
        """Boxes, presence and shape of every structure in one CT. ``priors``: also each present
        structure's shape prior (see :meth:`shape_priors`) in ``Localization.priors``."""
        t0 = time.perf_counter()
        volume = image if isinstance(image, Volume) else read_ct(image)
        t_read = time.perf_counter()
        st = self.settings
        source = WorkingSource(volume)
        fov = source.data_box()  # where the scan has data: boxes are clipped and presence judged there
        with torch.no_grad():
            # the 4 mm image first: on a fine scan the 8 mm image's blocks are made from its blocks
            coarse = self._query_image(source, st.global_spacing_mm, st.global_spacing_mm)
            search = self._query_image(source, 2 * st.global_spacing_mm, 8.0)
        t_prep = time.perf_counter()
        global_maps, global_scores = self._global(search, coarse, fov)
        first_global = global_maps.cpu().numpy().copy()  # as the global stage left them (stage report)
        t_global = time.perf_counter()
        with torch.no_grad():  # the local stage's image: only the block its points can reach
            fine = self._query_image(source.crop(*self._local_block(volume.geometry, first_global)),
                                     self._local_spacing(volume.geometry), st.local_sigma_mm, st.local_hu_range)
        t_fine = time.perf_counter()
        local_maps, local_scores = self._local(fine, global_maps, range(len(self.prepared)))
        realigned = self._realign_outliers(fine, global_maps, local_maps, local_scores) if st.realign_outliers else []
        t_local = time.perf_counter()
        result = self._assemble(volume.geometry, fov, first_global, global_scores.cpu().numpy(),
                                local_maps, local_scores, keep_stages, realigned)
        if priors:
            self.learn_thresholds()
            result["priors"] = self.shape_priors(volume, source.pad, result["structures"], local_maps, result["used"])
            if self.settings.refine is not None:  # +0.5 Dice points on the tuning scans (docs/results.md)
                for name, (offset, prob) in result["priors"].items():
                    boxes = _mask_slice_boxes(prob > 0.5, offset, volume.geometry.axial_axis)
                    if boxes:  # the segmenter's slices and 2D prompts follow the refined mask
                        result["structures"][name] = dataclasses.replace(result["structures"][name],
                                                                         slice_boxes_ijk=boxes)
        t_end = time.perf_counter()
        timing = {"read": t_read - t0, "preprocess": t_prep - t_read + t_fine - t_global, "global": t_global - t_prep,
                  "local": t_local - t_fine, "fuse": t_end - t_local, "templates_setup": self.setup_s,
                  "total_query": t_end - t0}
        return Localization(
            image=str(volume.meta.get("path", volume.name)), mode=self.mode,
            templates=[str(t.directory) for t in self.templates], localizer=self.describe(), device=str(self.device),
            structures=result["structures"], stages=result["stages"] if keep_stages else None,
            priors=result.get("priors", {}), timing_s={k: round(v, 3) for k, v in timing.items()})

    def _query_image(self, source: WorkingSource, spacing: float, sigma: float, hu_range=HU_RANGE) -> QueryImage:
        arr, valid, geo = working_image(source, spacing, sigma, hu_range)
        return QueryImage.from_array(arr, geo, self.device, valid)

    def _local_spacing(self, geometry: Geometry) -> np.ndarray:
        """The local image's spacing along the query's i, j, k: the setting, raised towards the
        templates' own detail (HybridSettings.local_detail_fraction)."""
        detail = np.min([p.detail_lps for p in self.prepared], axis=0) * self.settings.local_detail_fraction
        return np.maximum(self.settings.local_spacing_mm, geometry.index_spacing(detail))

    def _local_block(self, geometry: Geometry, global_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ijk block (inclusive) of the query that the local stage can reach: every template's
        structure neighbourhoods under its global map, plus room for the local affines to move
        (local_block_margin_mm). The local stage's cost then follows the structures, not the scan."""
        pts = np.concatenate([apply_affine(global_maps[t], s.points) for t, p in enumerate(self.prepared)
                              for s in [*p.structures.values(), *(q for ps in p.parts.values() for q in ps)]])
        box = box_from_points(pts)
        margin = self.settings.local_block_margin_mm
        corners = _corners(np.stack([box[0] - margin, box[1] + margin]))
        ijk = geometry.lps_to_ijk(corners)
        last = np.asarray(geometry.size) - 1
        lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, last)
        hi = np.clip(np.ceil(ijk.max(0)).astype(int), 0, last)
        # at least 8 voxels a side where the scan has them (smoothing needs a few): a block that
        # the maps put at or past the scan's edge is widened into it
        short = hi - lo < 7
        lo = np.where(short, np.clip(np.minimum(lo, last - 7), 0, None), lo)
        hi = np.where(short, np.minimum(lo + 7, last), hi)
        return lo, hi

    def _global(self, search: QueryImage, coarse: QueryImage, fov: np.ndarray):
        """One affine per template (template LPS -> query LPS) and its blockwise NCC."""
        st, dev = self.settings, self.device
        rng = np.random.default_rng(st.seed)
        body = torch.nonzero((coarse.data[0, 0] > 100.0) & (coarse.data[0, 1] > 0.5)).cpu().numpy()
        if len(body) < 100:
            raise InputError("no body found in the image (is it empty or all air?)")
        q_centroid = coarse.geometry.ijk_to_lps(body[:, ::-1].astype(float)).mean(0)
        if st.search_beyond_fov:  # how far each template's centre can lie beyond the query's data
            # (only as far as a short query needs: 58.4 % Dice on dev against 60.3 %, docs/results.md)
            reach = max(float(np.max(np.abs(p.global_points[:, 2] - p.centroid[2]))) for p in self.prepared)
            z_range = (fov[0, 2] - reach, fov[1, 2] + reach)
        else:  # the sixth session's range: the query's grid
            grid = box_from_points(coarse.geometry.corners_lps())
            z_range = (grid[0, 2], grid[1, 2])
        z_starts = np.arange(z_range[0], z_range[1] + 1e-6, st.search_step_mm)
        n_t, n_z = len(self.prepared), len(z_starts)
        # 1. translation-only search: score every (template, head-foot start), keep the best few.
        pts, vals, shifts, centres = [], [], [], []
        for p in self.prepared:
            sub = rng.choice(len(p.global_points), min(st.search_points, len(p.global_points)), replace=False)
            for z in z_starts:
                pts.append(p.global_points[sub])
                vals.append(p.search_values[sub])
                shifts.append([q_centroid[0] - p.centroid[0], q_centroid[1] - p.centroid[1], z - p.centroid[2]])
                centres.append(p.centroid)
        sets = PointSets(_tensor(np.stack(pts), dev), _tensor(np.stack(vals), dev),
                         torch.ones(n_t * n_z, len(pts[0]), device=dev), _tensor(np.stack(centres), dev))
        start = torch.eye(4, device=dev).repeat(n_t * n_z, 1, 1)
        start[:, :3, 3] = _tensor(np.array(shifts), dev)
        with torch.no_grad():
            # NCC over the points that land on data, times their share: a start that matches well
            # but keeps little of the template on the scan does not win.
            v, inside = search.sample(sets.points + start[:, None, :3, 3])
            score = weighted_ncc(sets.values, v, inside) * inside.mean(1)
        keep = min(st.search_keep, n_z)
        top = (torch.arange(n_t, device=dev)[:, None] * n_z + score.reshape(n_t, n_z).topk(keep, dim=1).indices).reshape(-1)
        sets = PointSets(sets.points[top], sets.values[top], sets.weights[top], sets.centres[top])
        moved, moved_score = align(search, sets, start[top], AlignSettings(
            iterations=30, lr_translation_mm=3.0, translation_only_iterations=30, block_mm=st.block_mm,
            ignore_outside=st.global_ignore_outside))
        best = moved_score.reshape(n_t, keep).argmax(1)
        start = moved.reshape(n_t, keep, 4, 4)[torch.arange(n_t, device=dev), best]
        # 2. one affine per template on the 4 mm image.
        points = _tensor(np.stack([p.global_points for p in self.prepared]), dev)
        weights = torch.ones(n_t, st.global_points, device=dev)
        if st.global_static_outside:  # points the start puts off the query's data do not vote
            with torch.no_grad():
                _, inside = coarse.sample(points @ start[:, :3, :3].transpose(1, 2) + start[:, None, :3, 3])
            weights = (inside > 0.5).float()
            weights[weights.sum(1) < 100] = 1.0  # (almost) nothing on the data: leave it as it was
        sets = PointSets(points, _tensor(np.stack([p.global_values for p in self.prepared]), dev), weights,
                         _tensor(np.stack([p.centroid for p in self.prepared]), dev))
        return align(coarse, sets, start, AlignSettings(
            iterations=st.global_iterations, lr_translation_mm=2.0, max_scale_change=st.global_max_scale,
            translation_only_iterations=10, block_mm=st.block_mm, ignore_outside=st.global_ignore_outside))

    def _local(self, fine: QueryImage, global_maps: torch.Tensor, templates):
        """One affine per (template, structure) and per (template, structure, part) of a structure
        aligned in parts, on top of that template's global map."""
        st, dev = self.settings, self.device
        # each (template, structure) and each (template, structure, part) of a long structure
        pairs = [(t, name) for t in templates for name in self.structures]
        pairs += [(t, name, k) for t in templates for name in self.structures
                  for k in range(len(self.prepared[t].parts.get(name, [])))]
        structs = [self.prepared[p[0]].structures[p[1]] if len(p) == 2 else self.prepared[p[0]].parts[p[1]][p[2]]
                   for p in pairs]
        sets = PointSets(_tensor(np.stack([s.points for s in structs]), dev),
                         _tensor(np.stack([s.values for s in structs]), dev),
                         _tensor(np.stack([s.weights for s in structs]), dev),
                         _tensor(np.stack([s.centre for s in structs]), dev))
        # Only the points on data count, step by step. (Tenth session: fixing which points count
        # at the global map's placement, a point that moves off the data then reading as air, as
        # the global stage does, found fewer structures on 5 of 6 tuning scans: docs/results.md.)
        maps, scores = align(fine, sets, global_maps[[p[0] for p in pairs]], AlignSettings(
            iterations=st.local_iterations, lr_translation_mm=1.0, lr_linear=0.01,
            max_scale_change=st.local_max_scale, translation_only_iterations=20, ignore_outside=True,
            final_lr_fraction=st.local_final_lr))
        maps, scores = maps.cpu().numpy().astype(float), scores.cpu().numpy()
        return ({pair: maps[n] for n, pair in enumerate(pairs)}, {pair: float(scores[n]) for n, pair in enumerate(pairs)})

    def _realign_outliers(self, fine: QueryImage, global_maps: torch.Tensor, local_maps: dict, local_scores: dict):
        """Give a template whose global alignment failed a second start: the affine that takes its
        structure boxes onto the other templates' consensus boxes, then the local stage again.
        Updates the maps in place; returns the indices of the templates realigned."""
        boxes = self._boxes(local_maps)
        used, _ = consensus_templates(boxes, self.fusion)
        outliers = [t for t in range(len(self.prepared)) if t not in set(used)]
        if not outliers or len(used) < 2:
            return []
        consensus = np.stack([fuse_boxes(boxes[:, s], used, self.fusion.trimmed_from).box
                              for s in range(len(self.structures))])
        target = np.concatenate([_corners(b) for b in consensus])
        for t in outliers:
            own = np.concatenate([_corners(box_from_points(self.prepared[t].structures[n].shape)) for n in self.structures])
            global_maps[t] = _tensor(_fit_affine(own, target), self.device)
        maps, scores = self._local(fine, global_maps, outliers)
        local_maps.update(maps)
        local_scores.update(scores)
        return outliers

    def _boxes(self, local_maps: dict) -> np.ndarray:
        """[T, S, 2, 3]: each template's box of each structure in the query (LPS)."""
        return np.stack([[box_from_points(self._mapped_shape(t, n, local_maps)) for n in self.structures]
                         for t in range(len(self.prepared))])

    def _mapped_shape(self, t: int, name: str, local_maps: dict) -> np.ndarray:
        """Template ``t``'s shape of ``name`` in the query: by the structure's local affine, or
        part by part where the structure was aligned in parts."""
        parts = self.prepared[t].parts.get(name)
        if parts:
            return np.concatenate([apply_affine(local_maps[(t, name, k)], part.shape) for k, part in enumerate(parts)])
        return apply_affine(local_maps[(t, name)], self.prepared[t].structures[name].shape)

    # -- result --------------------------------------------------------------------------------
    def _assemble(self, geometry: Geometry, fov: np.ndarray, global_maps, global_scores, local_maps, local_scores,
                  keep_stages: bool, realigned=()) -> dict:
        """``fov``: the LPS box of the query's data; boxes are clipped to it and presence is judged in it."""
        n_t = len(self.prepared)
        shapes = {(t, name): self._mapped_shape(t, name, local_maps) for t in range(n_t) for name in self.structures}
        boxes = np.stack([[box_from_points(shapes[(t, n)]) for n in self.structures] for t in range(n_t)])
        used, agreement = consensus_templates(boxes, self.fusion)
        shown = {k: shown_fraction(v, fov) for k, v in shapes.items()}  # of the whole mapped shapes
        if self.fusion.visible_boxes:
            # the boxes fused are of what the scan shows (fusion.visible_box); consensus and
            # presence keep the whole shapes
            seen = np.stack([[visible_box(shapes[(t, n)], fov) for n in self.structures] for t in range(n_t)])
            shapes = {k: visible_part(v, fov) for k, v in shapes.items()}
        out, stages = {}, {}
        for s, name in enumerate(self.structures):
            fused = fuse_boxes(boxes[:, s], used, self.fusion.trimmed_from)
            frac = inside_fraction(fused.box, fov)  # judged before open faces reach the data's end
            visible = float(np.median([shown[(t, name)] for t in used]))
            if self.fusion.visible_boxes:
                fused = fuse_boxes(seen[:, s], used, self.fusion.trimmed_from)
            open_votes = np.stack([self.prepared[t].structures[name].open_faces for t in used])
            closed = np.clip(fused.box, fov[0], fov[1])
            fused.box = extend_open_faces(fused.box, open_votes, fov, self.fusion.open_face_share)
            box_agreement = fused.agreement
            voters = used
            if len(used) == 1 and n_t > 1:  # a lone voter agrees with itself: judge it against every template
                box_agreement = box_iou(boxes[used[0], s], np.median(boxes[:, s], axis=0))
                voters = np.arange(n_t)
            visible_agreement = agreement_in_data(seen[voters, s] if self.fusion.visible_boxes else boxes[voters, s],
                                                  closed, fov)
            evidence = {"match": float(np.median([local_scores[(t, name)] for t in used])),
                        "global_match": float(np.median(global_scores[used])), "agreement": box_agreement,
                        "templates_used": len(used), "inside_fraction": frac, "visible_fraction": visible,
                        "visible_agreement": visible_agreement}
            if self.fusion.presence == "visible":
                present = visible >= self.fusion.min_visible_fraction
            else:  # "box": the sixth session's rule
                present = frac >= self.fusion.min_inside_fraction
            out[name] = self._structure_entry(name, geometry, fov, fused, shapes[(fused.medoid, name)], present,
                                              evidence, n_t, self.prepared[fused.medoid].structures[name].from_mask)
            if keep_stages:
                global_boxes = np.stack([box_from_points(apply_affine(global_maps[t], self.prepared[t].structures[name].shape))
                                         for t in range(n_t)])
                stages[name] = {
                    "global": np.median(global_boxes, 0).tolist(),
                    "local": np.median(boxes[:, s], 0).tolist(),
                    "closed_faces": closed.tolist(),  # the final box without extend_open_faces
                    "final": fused.box.tolist(),
                    "per_template_local": {p.name: boxes[t, s].tolist() for t, p in enumerate(self.prepared)},
                    "per_template_global": {p.name: b.tolist() for p, b in zip(self.prepared, global_boxes)},
                    "global_scores": [round(float(v), 4) for v in global_scores],
                    "local_scores": {p.name: round(local_scores[(t, name)], 4) for t, p in enumerate(self.prepared)},
                    "template_agreement": [round(float(v), 4) for v in agreement],
                    "templates_used": [self.prepared[t].name for t in used],
                    "templates_realigned": [self.prepared[t].name for t in realigned],
                }
        return {"structures": out, "stages": stages, "used": used}

    def shape_priors(self, volume: Volume, pad: float | None, structures: dict, local_maps: dict, used,
                     margin: int = 2) -> dict:
        """Per present structure: the voting templates' masks carried onto the query by their own
        local affine, each refined by a deformable registration and the templates fused with
        weights (``HybridSettings.refine``, refine.py), or, with ``refine=None``, averaged; in the
        structure's box + ``margin`` voxels. Returns ``{name: (offset_kji, probability float32
        [k, j, i])}`` (0.5 is the structure's edge); structures whose templates have no mask are
        left out. The segmenter can blend it with SAM (SegmentOptions.prior_weight)."""
        out = {}
        geometry = volume.geometry
        size = np.asarray(geometry.size)
        for name, entry in structures.items():
            voters = [t for t in used if self.prepared[t].structures[name].mask.size]
            if not entry.present or not voters:
                continue
            lo = np.maximum(np.asarray(entry.box_ijk[0]) - margin, 0)
            hi = np.minimum(np.asarray(entry.box_ijk[1]) + margin, size - 1)
            positions = _BoxGrid(geometry.ijk_to_lps_matrix, lo, hi).mapped(np.eye(4)).double()
            if self.settings.refine is not None and all(self.prepared[t].structures[name].image.size for t in voters):
                prob = self._refined_prior(volume, pad, name, voters, local_maps, lo, hi, positions)
            else:
                prob = (sum(self._carried_mask(t, name, local_maps, positions) for t in voters) / len(voters)).numpy()
            out[name] = (lo[::-1].copy(), prob.astype(np.float32))
        return out

    def _refined_prior(self, volume: Volume, pad, name: str, voters, local_maps: dict, lo, hi,
                       positions: torch.Tensor) -> np.ndarray:
        """The fused probability of ``name`` at the query voxels ``positions`` (LPS, [k, j, i, 3])
        of the box ``lo`` .. ``hi``: each voter's mask warped by its demons field, outliers left
        out, the rest weighted by local similarity (refine.py)."""
        rs = self.settings.refine
        masks, weights = self._warped_masks(volume, pad, name, voters, local_maps, lo, hi, positions)
        kept = refine.leave_out_outliers(masks, rs.outlier_mad)
        return refine.fuse([masks[k] for k in kept], [weights[k] for k in kept], self.thresholds.get(name, rs.threshold))

    def _warped_masks(self, volume: Volume, pad, name: str, voters, local_maps: dict, lo, hi,
                      positions: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per voter: its mask of ``name`` warped onto ``positions`` by its demons field, and its
        local similarity weight there."""
        rs = self.settings.refine
        geometry = volume.geometry
        # the templates' voxels along L, P, S (as Geometry.spacing_lps: |direction| @ spacing)
        detail = np.min([np.abs(self.prepared[t].structures[name].image_ijk_to_lps[:3, :3]) @ np.ones(3)
                         for t in voters], axis=0)
        floor = geometry.index_spacing(detail) * self.settings.local_detail_fraction
        grid = refine.crop_grid(geometry.ijk_to_lps_matrix, lo, hi, rs, floor)
        crop_lps = grid.positions()
        low, high = rs.hu_range
        raw = refine.sample(volume.array, geometry.ijk_to_lps_matrix, crop_lps, fill=np.nan, nearest=True)
        fixed_valid = torch.isfinite(raw) & ((raw != pad) if pad is not None else True)
        fixed = refine.sample(volume.array, geometry.ijk_to_lps_matrix, crop_lps, fill=low).clamp(low, high).numpy()
        linear = torch.as_tensor(grid.ijk_to_lps[:3, :3], dtype=torch.float64)  # crop voxel steps -> LPS
        to_crop = np.linalg.inv(grid.ijk_to_lps)
        out_crop = refine.transform_points(to_crop, positions)
        masks, weights = [], []
        fixed_image = refine.demons_image(fixed, grid.spacing, rs)
        for t in voters:
            s = self.prepared[t].structures[name]
            image = np.where(s.image == refine.NO_DATA, low, s.image).astype(np.float32)
            has_data = (s.image != refine.NO_DATA).astype(np.uint8)

            def template_values(query_lps):
                where = self._template_positions(t, name, local_maps, query_lps)
                valid = refine.sample(has_data, s.image_ijk_to_lps, where, nearest=True) > 0.5
                return refine.sample(image, s.image_ijk_to_lps, where, fill=low).clamp(low, high).numpy(), valid

            moving, moving_valid = template_values(crop_lps)
            both = (fixed_valid & moving_valid).numpy()
            moving = np.where(both, moving, fixed)  # no force where either scan has no data
            field = refine.demons(fixed_image, moving, grid.spacing, rs)
            warped_lps = crop_lps + torch.as_tensor(field, dtype=torch.float64) @ linear.T
            warped, warped_valid = template_values(warped_lps)
            weight = refine.similarity_weight(fixed, warped, both & warped_valid.numpy(), grid.spacing, rs)
            # the output voxels: displaced by the field interpolated at them
            displaced = positions + refine.interpolate_field(field, out_crop).double() @ linear.T
            masks.append(self._carried_mask(t, name, local_maps, displaced).numpy())
            weights.append(refine.interpolate_field(weight[..., None], out_crop)[..., 0].numpy())
        return masks, weights

    def _template_positions(self, t: int, name: str, local_maps: dict, query_lps: torch.Tensor) -> torch.Tensor:
        """Query LPS positions ([..., 3]) in template ``t``'s LPS: through the structure's local
        affine, or, for a structure aligned in parts, through the part whose head-foot slab each
        position falls in (in the template's frame), else the nearest, as its box was made."""
        parts = self.prepared[t].parts.get(name)
        if not parts:
            return refine.transform_points(np.linalg.inv(local_maps[(t, name)]), query_lps)
        mapped = [refine.transform_points(np.linalg.inv(local_maps[(t, name, n)]), query_lps) for n in range(len(parts))]
        slab_distance = []
        for part, where in zip(parts, mapped):
            lo, hi = float(part.shape[:, 2].min()), float(part.shape[:, 2].max())
            slab_distance.append(torch.clamp(torch.maximum(lo - where[..., 2], where[..., 2] - hi), min=0))
        nearest = torch.argmin(torch.stack(slab_distance), dim=0)
        out = mapped[0].clone()
        for n in range(1, len(parts)):
            chosen = nearest == n
            out[chosen] = mapped[n][chosen]
        return out

    def _carried_mask(self, t: int, name: str, local_maps: dict, query_lps: torch.Tensor) -> torch.Tensor:
        """Template ``t``'s mask of ``name`` sampled (trilinear, 0 outside) at query LPS positions."""
        s = self.prepared[t].structures[name]
        return refine.sample(s.mask, s.mask_ijk_to_lps, self._template_positions(t, name, local_maps, query_lps))

    def _structure_entry(self, name, geometry: Geometry, fov, fused: FusedBox, medoid_shape, present,
                         evidence: dict, n_templates, from_mask) -> StructureResult:
        box = np.stack([np.clip(fused.box[0], fov[0], fov[1]), np.clip(fused.box[1], fov[0], fov[1])])
        # the box's thinnest side, kept in the evidence for confidence studies (the model does not
        # read it: it did not tell wrong boxes from right ones on the tuning scans, docs/localizer.md)
        evidence = {**evidence, "extent_mm": float(np.min(box[1] - box[0])), "height_mm": float(box[1, 2] - box[0, 2])}
        shape = fit_shape(medoid_shape, fused.box)
        shape = shape[np.all((shape >= fov[0] - 1e-6) & (shape <= fov[1] + 1e-6), axis=1)]
        parts = [box]
        if self.mode == "spl" and from_mask and len(shape) > 6:
            extent = float(np.ptp(shape[:, 2]))
            n_parts = int(max(1, min(extent // SPL_INTERVAL_MM, SPL_MAX_PARTS)))
            parts = _slab_boxes(shape, n_parts) if n_parts > 1 else parts
        return StructureResult(
            label=self.templates[0].structures[name].label, present=bool(present),
            confidence=round(confidence(evidence, n_templates, self.fusion), 4) if present else 0.0,
            box_lps=box.round(3).tolist(), box_ijk=box_lps_to_ijk(box, geometry).tolist(),
            sub_boxes_lps=[b.round(3).tolist() for b in parts],
            sub_boxes_ijk=[box_lps_to_ijk(b, geometry).tolist() for b in parts],
            extreme_points_lps=(extreme_points_of_cloud(shape, 1.0) if len(shape) else
                                extreme_points_of_cloud(box_from_points(box), 1.0)).round(3).tolist(),
            slice_boxes_ijk=_slice_boxes(shape, geometry) if from_mask else None,
            evidence={k: round(v, 4) if isinstance(v, float) else v for k, v in evidence.items()},
            note="SPL needs template label maps; used one box (WPL)" if self.mode == "spl" and not from_mask else None)


class _BoxGrid:
    """The query voxels of an inclusive ijk box, mapped by affines without listing them: each
    affine image is a sum of one term per axis (broadcast), so a 512 x 512 scan's box costs no
    N x 3 arrays of points."""

    def __init__(self, ijk_to_lps: np.ndarray, lo_ijk: np.ndarray, hi_ijk: np.ndarray):
        self.to_lps = ijk_to_lps
        self.axes = [torch.arange(int(lo_ijk[a]), int(hi_ijk[a]) + 1, dtype=torch.float64) for a in range(3)]
        self.shape = tuple(len(self.axes[a]) for a in (2, 1, 0))  # [k, j, i]

    def mapped(self, lps_to: np.ndarray, rows=(0, 1, 2)) -> torch.Tensor:
        """float32 [k, j, i, len(rows)]: ``lps_to`` (4 x 4) applied to each voxel's LPS position
        (only the output coordinates ``rows``)."""
        m = torch.as_tensor(lps_to @ self.to_lps, dtype=torch.float64)[list(rows)]
        i, j, k = (self.axes[a][:, None] * m[:, a] for a in range(3))
        return (k[:, None, None] + j[None, :, None] + i[None, None, :] + m[:, 3]).float()


def _corners(box: np.ndarray) -> np.ndarray:
    """The 8 corners of a (2, 3) box."""
    return np.array([[box[i, 0], box[j, 1], box[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def _fit_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares (4, 4) affine taking ``source`` points (N, 3) onto ``target``."""
    design = np.hstack([source, np.ones((len(source), 1))])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)  # (4, 3)
    m = np.eye(4)
    m[:3, :] = solution.T
    return m


def _slab_boxes(shape: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """Boxes of ``n_parts`` equal head-foot slabs of a point cloud, inferior to superior."""
    z = shape[:, 2]
    edges = np.linspace(z.min(), z.max(), n_parts + 1)
    out = []
    for p in range(n_parts):
        last = p == n_parts - 1
        sel = shape[(z >= edges[p] - 1e-6) & ((z <= edges[p + 1] + 1e-6) if last else (z < edges[p + 1]))]
        if len(sel):
            out.append(box_from_points(sel))
    return out


def _mask_slice_boxes(mask_kji: np.ndarray, offset_kji, axial_axis: int) -> list[list[list[int]]]:
    """One inclusive ijk box per axial slice of a block mask whose first voxel is ``offset_kji``."""
    ijk = np.argwhere(mask_kji)[:, ::-1] + np.asarray(offset_kji)[::-1]
    out = []
    for k in np.unique(ijk[:, axial_axis]):
        pts = ijk[ijk[:, axial_axis] == k]
        out.append([pts.min(0).tolist(), pts.max(0).tolist()])
    return out


def _slice_boxes(shape: np.ndarray, geometry: Geometry) -> list[list[list[int]]] | None:
    """One inclusive ijk box per axial slice that the shape touches (slices in a gap are left to
    the segmenter's gap filling)."""
    if len(shape) == 0:
        return None
    ijk = geometry.lps_to_ijk(shape)
    ax = geometry.axial_axis
    hi_limit = np.asarray(geometry.size) - 1
    s = np.rint(ijk[:, ax]).astype(int)
    out = []
    for k in np.unique(s):
        if not 0 <= k <= hi_limit[ax]:
            continue
        pts = ijk[s == k]
        lo = np.clip(np.floor(pts.min(0)), 0, hi_limit).astype(int)
        hi = np.clip(np.ceil(pts.max(0)), 0, hi_limit).astype(int)
        lo[ax] = hi[ax] = k
        out.append([lo.tolist(), hi.tolist()])
    return out

