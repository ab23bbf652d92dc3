"""What a template set teaches itself, by leave-one-template-out: each template's CT segmented by
the other templates, as any scan would be.

From those runs, once per template set (cached beside the prepared templates), **a vote threshold
per structure**: the cut of the fused, weighted vote (refine.fuse) that gives the best mean Dice
against the left-out templates' own label-map masks. Nothing names a structure: a thin structure
that templates miss by a voxel can learn a lower cut, a bulky one a higher cut. A mask MedLSAM made
from six points is no contour to learn from: a structure no template holds a label map of keeps
``RefineSettings.threshold``.

Needs at least three templates (a structure left to one voter learns nothing). Measured:
docs/results.md, "Masks that follow the anatomy" (also why six-point masks are not improved by
the other templates' consensus here: tried, worse).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..point_masks import mask_on_image

#: the vote cuts tried
CANDIDATE_THRESHOLDS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
LEARN_FORMAT = 3


def learned_key(template_keys: list[str], names: list[str], settings_key: dict) -> str:
    return hashlib.sha256(json.dumps({"format": LEARN_FORMAT, "templates": template_keys, "names": list(names),
                                      "settings": settings_key}, sort_keys=True).encode()).hexdigest()


def learn_thresholds(localizer) -> tuple[dict[str, float], dict]:
    """(threshold per structure, mean Dice per candidate threshold and structure) of a
    ``HybridLocalizer``'s template set."""
    n = len(localizer.prepared)
    names = localizer.structures
    dice_sums = {name: np.zeros(len(CANDIDATE_THRESHOLDS)) for name in names}
    counts = dict.fromkeys(names, 0)
    for left_out in range(n):
        if all(localizer.prepared[left_out].structures[name].from_points or
               not localizer.prepared[left_out].structures[name].mask.size for name in names):
            continue  # nothing to learn from this template
        others = [t for t in range(n) if t != left_out]
        sub = copy.copy(localizer)
        sub.prepared = [localizer.prepared[t] for t in others]
        sub.templates = [localizer.templates[t] for t in others]
        sub.thresholds = dict.fromkeys(names, 0.5)  # the vote as it is (refine.fuse maps 0.5 onto itself)
        sub.learned = {"thresholds": sub.thresholds}  # (and it learns nothing itself)
        image = localizer.templates[left_out].load_image()
        loc = sub.localize(image, priors=True)
        for name in names:
            s = localizer.prepared[left_out].structures[name]
            if name not in loc.priors or not s.mask.size or s.from_points:
                continue
            offset, vote = loc.priors[name]
            own = mask_on_image(s.mask, s.mask_ijk_to_lps, image.geometry)
            own_in_block = own[tuple(slice(o, o + e) for o, e in zip(offset, vote.shape))]
            total_own = int(own.sum())
            for c, cut in enumerate(CANDIDATE_THRESHOLDS):
                pred = vote > cut
                denom = total_own + int(pred.sum())
                dice_sums[name][c] += 2.0 * np.logical_and(pred, own_in_block).sum() / denom if denom else 1.0
            counts[name] += 1
    thresholds, report = {}, {}
    for name in names:
        if counts[name]:
            mean = dice_sums[name] / counts[name]
            thresholds[name] = float(CANDIDATE_THRESHOLDS[int(np.argmax(mean))])
            report[name] = {f"{cut:.2f}": round(float(m), 4) for cut, m in zip(CANDIDATE_THRESHOLDS, mean)}
    return thresholds, report


def load_learned(path: Path):
    """(thresholds, report) from a cache file, or None if it cannot be read."""
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data["thresholds"].items()}, data["report"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


def save_learned(path: Path, thresholds: dict, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"thresholds": thresholds, "report": report}))
    os.replace(tmp, path)
