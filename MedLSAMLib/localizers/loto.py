"""What a template set teaches itself, by leave-one-template-out: each template's CT segmented by
the other templates, as any scan would be.

From those runs, once per template set (cached beside the prepared templates):

* **A vote threshold per structure**: the cut of the fused, weighted vote (refine.fuse) that gives
  the best mean Dice against the left-out templates' own label-map masks (a mask MedLSAM made from
  six points is no contour to learn from: the structure keeps ``RefineSettings.threshold``). Nothing names a structure: a thin
  structure that templates miss by a voxel learns a lower cut, a bulky one a higher cut.
* **Six-point masks improved by the others** (``RefineSettings.consensus_point_masks``): a
  template whose mask of a structure was made from its six points (about 72 % Dice against the
  contour on its own CT) takes the consensus of that mask and the other templates' masks carried
  onto it, kept inside its points' box with its six point voxels in it, so its points are still
  the mask's extremes.

Needs at least three templates (a structure left to one voter learns nothing).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..geometry import box_from_points
from ..point_masks import mask_on_image

#: the vote cuts tried
CANDIDATE_THRESHOLDS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
LEARN_FORMAT = 2


def learned_key(template_keys: list[str], names: list[str], settings_key: dict) -> str:
    return hashlib.sha256(json.dumps({"format": LEARN_FORMAT, "templates": template_keys, "names": list(names),
                                      "settings": settings_key}, sort_keys=True).encode()).hexdigest()


def learn(localizer) -> tuple[dict[str, float], dict[tuple[int, str], np.ndarray], dict]:
    """(threshold per structure, improved mask per (template index, structure) for six-point
    masks, a report of the Dice per candidate threshold) of a ``HybridLocalizer``."""
    n = len(localizer.prepared)
    names = localizer.structures
    dice_sums = {name: np.zeros(len(CANDIDATE_THRESHOLDS)) for name in names}
    counts = dict.fromkeys(names, 0)
    improved: dict[tuple[int, str], np.ndarray] = {}
    consensus = localizer.settings.refine.consensus_point_masks
    learn_cut = localizer.settings.refine.learn_thresholds
    for left_out in range(n):
        others = [t for t in range(n) if t != left_out]
        sub = copy.copy(localizer)
        sub.prepared = [localizer.prepared[t] for t in others]
        sub.templates = [localizer.templates[t] for t in others]
        sub.thresholds = dict.fromkeys(names, 0.5)  # the vote as it is (refine.fuse maps 0.5 onto itself)
        image = localizer.templates[left_out].load_image()
        loc = sub.localize(image, priors=True)
        g = image.geometry
        for name in names:
            s = localizer.prepared[left_out].structures[name]
            if name not in loc.priors or not s.mask.size:
                continue
            offset, vote = loc.priors[name]
            own = mask_on_image(s.mask, s.mask_ijk_to_lps, g)
            block = tuple(slice(o, o + e) for o, e in zip(offset, vote.shape))
            vote_full = np.zeros(own.shape, np.float32)
            vote_full[block] = vote
            own_in_block = own[block]
            total_own = int(own.sum())
            if learn_cut and not s.from_points:  # a contour teaches the cut; a mask MedLSAM made does not
                for c, cut in enumerate(CANDIDATE_THRESHOLDS):
                    pred = vote > cut
                    denom = total_own + int(pred.sum())
                    dice_sums[name][c] += 2.0 * np.logical_and(pred, own_in_block).sum() / denom if denom else 1.0
                counts[name] += 1
            if consensus and s.from_points:
                points = localizer.templates[left_out].structures[name].points
                improved[(left_out, name)] = consensus_mask(s.mask, s.mask_ijk_to_lps, points, vote_full, len(others), g)
    thresholds, report = {}, {}
    for name in names:
        if counts[name]:
            mean = dice_sums[name] / counts[name]
            thresholds[name] = float(CANDIDATE_THRESHOLDS[int(np.argmax(mean))])
            report[name] = {f"{cut:.2f}": round(float(m), 4) for cut, m in zip(CANDIDATE_THRESHOLDS, mean)}
    return thresholds, improved, report


def consensus_mask(mask: np.ndarray, mask_ijk_to_lps: np.ndarray, points: np.ndarray, vote_full: np.ndarray,
                   voters: int, geometry) -> np.ndarray:
    """A six-point mask (a block on its own grid, ``mask_ijk_to_lps``) and the other templates'
    vote on the image (``vote_full``, [k, j, i] on ``geometry``), one template's say each: kept
    where (own + voters x vote) / (voters + 1) > 0.5, inside the points' box, with the six points'
    voxels, so the points stay the mask's extremes. Returned on the mask's block grid."""
    own = mask_on_image(mask, mask_ijk_to_lps, geometry)
    agree = (own.astype(np.float32) + voters * vote_full) / (voters + 1) > 0.5
    # back onto the point mask's block (it may be coarser than the image): nearest image voxel
    kji = np.indices(mask.shape).reshape(3, -1).T
    lps = (np.hstack([kji[:, ::-1], np.ones((len(kji), 1))]) @ mask_ijk_to_lps.T)[:, :3]
    ijk = np.rint(geometry.lps_to_ijk(lps)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(geometry.size)), axis=1)
    values = np.zeros(len(kji), bool)
    values[inside] = agree[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    box = box_from_points(points)
    values &= np.all((lps >= box[0] - 1e-6) & (lps <= box[1] + 1e-6), axis=1)
    out = values.reshape(mask.shape)
    at = np.rint(np.hstack([points, np.ones((len(points), 1))]) @ np.linalg.inv(mask_ijk_to_lps).T)[:, :3]
    at = np.clip(at.astype(int), 0, np.array(mask.shape[::-1]) - 1)
    out[at[:, 2], at[:, 1], at[:, 0]] = True
    return out.astype(np.uint8)


def improve_point_masks(volume, masks: dict, localizer) -> dict:
    """Six-point masks made on ``volume`` (``{name: (block, block_ijk_to_lps, points)}``) improved
    by the templates of ``localizer`` (which must not include this volume): each structure they
    find takes :func:`consensus_mask`. Structures they do not hold or find are returned as given."""
    names = [n for n in masks if n in localizer.structures]
    sub = copy.copy(localizer)
    sub.thresholds = dict.fromkeys(localizer.structures, 0.5)  # the vote as it is
    loc = sub.localize(volume, priors=True) if names else None
    out = {}
    for name, (block, matrix, points) in masks.items():
        if loc is None or name not in loc.priors:
            out[name] = block
            continue
        offset, vote = loc.priors[name]
        full = np.zeros(volume.geometry.shape_kji, np.float32)
        full[tuple(slice(o, o + e) for o, e in zip(offset, vote.shape))] = vote
        out[name] = consensus_mask(block, matrix, points, full, len(localizer.prepared), volume.geometry)
    return out


def load_learned(path: Path):
    """(thresholds, improved masks, report) from a cache file, or None if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            improved = {(int(t), name): z[f"m{k}"] for k, (t, name) in enumerate(meta["improved"])}
            return meta["thresholds"], improved, meta["report"]
    except (OSError, ValueError, KeyError):
        return None


def save_learned(path: Path, thresholds: dict, improved: dict, report: dict) -> None:
    keys = list(improved)
    arrays = {f"m{k}": improved[key] for k, key in enumerate(keys)}
    arrays["meta"] = np.array(json.dumps({"thresholds": thresholds, "report": report,
                                          "improved": [[t, name] for t, name in keys]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
