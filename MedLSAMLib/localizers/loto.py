"""What a template set teaches itself, by leave-one-template-out: each template's CT segmented by
the other templates, as any scan would be.

From those runs, once per template set (cached beside the prepared templates):

* **A vote threshold per structure**: the cut of the fused, weighted vote (refine.fuse) that gives
  the best mean Dice against the left-out templates' own masks. Nothing names a structure: a thin
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
LEARN_FORMAT = 1


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
            own_in_block = own[block]
            total_own = int(own.sum())
            for c, cut in enumerate(CANDIDATE_THRESHOLDS):
                pred = vote > cut
                denom = total_own + int(pred.sum())
                dice_sums[name][c] += 2.0 * np.logical_and(pred, own_in_block).sum() / denom if denom else 1.0
            counts[name] += 1
            if consensus and s.from_points:
                points = localizer.templates[left_out].structures[name].points
                improved[(left_out, name)] = _consensus(s, points, own, vote, block, len(others), g)
    thresholds, report = {}, {}
    for name in names:
        if counts[name]:
            mean = dice_sums[name] / counts[name]
            thresholds[name] = float(CANDIDATE_THRESHOLDS[int(np.argmax(mean))])
            report[name] = {f"{cut:.2f}": round(float(m), 4) for cut, m in zip(CANDIDATE_THRESHOLDS, mean)}
    return thresholds, improved, report


def _consensus(s, points: np.ndarray, own: np.ndarray, vote: np.ndarray, block, voters: int, geometry) -> np.ndarray:
    """A six-point mask and the other templates' vote, one template's say each: kept where
    (own + voters x vote) / (voters + 1) > 0.5, inside the points' box (the mask's own block),
    with the six points' voxels. Returned on the mask's own block grid (s.mask_ijk_to_lps)."""
    full = np.zeros(own.shape, np.float32)
    full[block] = vote
    agree = (own.astype(np.float32) + voters * full) / (voters + 1) > 0.5
    # back onto the point mask's block (it may be coarser than the image): nearest image voxel
    kji = np.indices(s.mask.shape).reshape(3, -1).T
    lps = np.hstack([kji[:, ::-1], np.ones((len(kji), 1))]) @ s.mask_ijk_to_lps.T
    ijk = np.rint(geometry.lps_to_ijk(lps[:, :3])).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(geometry.size)), axis=1)
    values = np.zeros(len(kji), bool)
    values[inside] = agree[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    box = box_from_points(points)
    values &= np.all((lps[:, :3] >= box[0] - 1e-6) & (lps[:, :3] <= box[1] + 1e-6), axis=1)
    out = values.reshape(s.mask.shape)
    at = np.rint(np.hstack([points, np.ones((len(points), 1))]) @ np.linalg.inv(s.mask_ijk_to_lps).T)[:, :3]
    at = np.clip(at.astype(int), 0, np.array(s.mask.shape[::-1]) - 1)
    out[at[:, 2], at[:, 1], at[:, 0]] = True  # the six points' voxels: still the mask's extremes
    return out.astype(np.uint8)


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
