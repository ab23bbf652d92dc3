"""Fusing one box per template into one box per structure; presence and confidence.

Measured on this project's head-and-neck data (docs/results.md): fusing boxes beats fusing
voxels (a majority vote of warped masks shrinks boxes where templates disagree), and a per-face
median is the robust statistic that a single misregistered template cannot drag.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..geometry import box_from_points, box_iou


@dataclass(frozen=True)
class FusionSettings:
    # A template is left out when its boxes agree with the templates' consensus (the per-face
    # median) less than this: mean IoU over its structures below max(min_agreement,
    # relative_agreement x the templates' median agreement). Its alignment failed, or it is a
    # scan of another body region. Measured on the dev set: docs/results.md.
    min_agreement: float = 0.3
    relative_agreement: float = 0.7
    # Fused faces: the mean of the middle values (the lowest and highest dropped) when at least
    # this many templates vote, else the median.
    trimmed_from: int = 4
    # Presence. "visible": a structure is reported absent when less than min_visible_fraction
    # of its mapped shape (median over the voting templates) lies in the query's data: a long
    # structure that leaves the scan stays present with the part shown. "box": absent when less
    # than min_inside_fraction of its fused box lies in the data (the sixth session's rule).
    presence: str = "visible"
    min_visible_fraction: float = 0.05
    min_inside_fraction: float = 0.3  # chosen on cropped dev scans: docs/results.md
    # A face that at least this share of the voting templates has "open" (their scan cut the
    # structure there) is moved out to the end of the query's data: see extend_open_faces.
    open_face_share: float = 0.5
    # Each template's box is that of the part of its mapped shape inside the query's data
    # (visible_box); False: of the whole shape (the fourth session's default; docs/localizer.md).
    visible_boxes: bool = True
    # Confidence: the probability that the box is right (IoU >= 0.4 with the part of the structure
    # the scan shows), from the evidence (CONFIDENCE_FEATURES) by a logistic model: intercept,
    # then one weight per feature. Fitted by benchmarks/confidence_fit.py on the hard cases
    # built from 24 scans that are neither dev scans nor templates (tenth session:
    # docs/bench/confidence_fit_tenth.md; judged on the dev scans' in docs/results.md). None:
    # the sixth session's heuristic (agreement x match x templates used).
    confidence_weights: tuple | None = (-15.358, 15.846, 6.209, 4.866, 1.067, 0.916, -6.399)

    def __post_init__(self):
        if self.presence not in ("visible", "box"):
            raise InputError(f"unknown presence rule {self.presence!r}; use 'visible' or 'box'")


@dataclass
class FusedBox:
    box: np.ndarray  # (2, 3) LPS
    used: np.ndarray  # indices of the templates that voted
    medoid: int  # the voting template whose box is most like the fused one (its shape is used)
    agreement: float  # mean IoU of the voting boxes with the fused box, 0..1


def consensus_templates(boxes: np.ndarray, settings: FusionSettings) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the templates that vote, each template's agreement) from boxes [T, S, 2, 3]:
    one box per template and structure."""
    n_t, n_s = boxes.shape[:2]
    median = np.median(boxes, axis=0)
    agreement = np.array([np.mean([box_iou(boxes[t, s], median[s]) for s in range(n_s)]) for t in range(n_t)])
    floor = max(settings.min_agreement, settings.relative_agreement * float(np.median(agreement)))
    keep = np.flatnonzero(agreement >= floor)
    return (keep if len(keep) else np.arange(n_t)), agreement


def fuse_boxes(boxes: np.ndarray, used: np.ndarray, trimmed_from: int = 4) -> FusedBox:
    """One box from ``boxes[used]`` ([T, 2, 3] LPS): per face, the trimmed mean (lowest and highest
    value dropped) when at least ``trimmed_from`` templates vote, else the median."""
    votes = boxes[used]
    if len(votes) >= trimmed_from:
        fused = np.sort(votes, axis=0)[1:-1].mean(axis=0)
    else:
        fused = np.median(votes, axis=0)
    fused[1] = np.maximum(fused[1], fused[0])
    ious = np.array([box_iou(b, fused) for b in votes])
    return FusedBox(fused, used, int(used[int(np.argmax(ious))]), float(np.mean(ious)))


def agreement_in_data(boxes: np.ndarray, fused: np.ndarray, fov: np.ndarray) -> float:
    """Mean IoU of ``boxes`` ([T, 2, 3] LPS) with ``fused`` ((2, 3)), all clipped to the data box
    ``fov``: how well the templates agree on the part of a structure the scan shows. For a
    structure mostly outside the data, whole boxes can agree well while their ends inside it,
    all the scan shows, do not (a box outside the data clips to nothing: IoU 0)."""
    clipped = np.clip(boxes, fov[0], fov[1])
    target = np.clip(fused, fov[0], fov[1])
    return float(np.mean([box_iou(b, target) for b in clipped])) if len(clipped) else 0.0


def extend_open_faces(box: np.ndarray, open_votes: np.ndarray, fov: np.ndarray, share: float) -> np.ndarray:
    """The box with each face that the templates mostly saw cut by their scan moved out to the
    query's data boundary ``fov``.

    Where a template's scan ends inside a structure (a spinal cord contoured to the last slice),
    its mapped face marks where that template's data ended, not where the structure does; the
    structure then runs on as far as the query shows it. ``open_votes``: [T, 2, 3] bool of the
    voting templates. Measured on the dev set: docs/results.md."""
    out = box.copy()
    extend = np.mean(open_votes, axis=0) >= share if len(open_votes) else np.zeros((2, 3), bool)
    out[0] = np.where(extend[0], np.minimum(out[0], fov[0]), out[0])
    out[1] = np.where(extend[1], np.maximum(out[1], fov[1]), out[1])
    return out


def visible_part(shape: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The points of a mapped shape inside the data box ``fov``; the whole shape when none is
    (then the structure is outside the scan, and presence reports it)."""
    inside = np.all((shape >= fov[0] - 1e-6) & (shape <= fov[1] + 1e-6), axis=1)
    return shape[inside] if inside.any() else shape


def visible_box(shape: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The box of a mapped shape as the scan shows it. Where the query's data ends inside a
    structure, the part of the shape past the end must not widen the box sideways (a spinal
    cord curving backwards below a short scan): the faces in the data come from the points
    inside it. A face that the shape crosses keeps the whole shape's value: the structure runs
    on there, fusion votes with that value and the fused box is clipped to the data afterwards.
    The shape crosses a face where some of its points lie past that face and inside the data's
    range on the other two axes: a cord that leaves a neck slab at its lower end does not cross
    the slab's posterior face, though its lower part lies behind it (the data of a slab at the
    head is narrower than the shoulders below)."""
    whole = box_from_points(shape)
    inside = visible_part(shape, fov)
    if len(inside) == len(shape):
        return whole  # all in the data (or none: the structure is outside the scan)
    box = box_from_points(inside)
    within = (shape >= fov[0] - 1e-6) & (shape <= fov[1] + 1e-6)  # [N, 3] per axis
    for axis in range(3):
        others = np.delete(within, axis, axis=1).all(axis=1)
        if np.any(others & (shape[:, axis] < fov[0, axis])):
            box[0, axis] = whole[0, axis]
        if np.any(others & (shape[:, axis] > fov[1, axis])):
            box[1, axis] = whole[1, axis]
    return box


def fit_shape(shape: np.ndarray, target_box: np.ndarray) -> np.ndarray:
    """Scale and move a point cloud per axis so that its bounding box is ``target_box``."""
    src = box_from_points(shape)
    size = np.maximum(src[1] - src[0], 1e-6)
    scale = np.where(src[1] - src[0] > 1e-6, (target_box[1] - target_box[0]) / size, 1.0)
    return (shape - src[0]) * scale + target_box[0]


def inside_fraction(box: np.ndarray, fov: np.ndarray) -> float:
    """Fraction of the box's volume inside the field-of-view box (1 for a degenerate box inside)."""
    lo, hi = np.maximum(box[0], fov[0]), np.minimum(box[1], fov[1])
    size = np.maximum(box[1] - box[0], 1e-3)
    return float(np.prod(np.clip(hi - lo, 0, None) / size)) if np.all(hi >= lo) else 0.0


def shown_fraction(shape: np.ndarray, fov: np.ndarray) -> float:
    """Share of a mapped shape's points inside the data box ``fov`` (its voxels, subsampled)."""
    if len(shape) == 0:
        return 0.0
    return float(np.mean(np.all((shape >= fov[0] - 1e-6) & (shape <= fov[1] + 1e-6), axis=1)))


#: What the confidence model reads, in FusionSettings.confidence_weights' order (after the intercept).
CONFIDENCE_FEATURES = ("match", "global_match", "visible_agreement", "visible_fraction", "templates_used_share",
                       "short_height")
#: A reported box lower than this head-foot (mm) is a sliver: ``short_height`` grows from 0 here to
#: 1 at no height. On the tuning scans' head-and-neck boxes judged right or wrong, 42 of 61 under
#: 15 mm high were wrong, 43 of 753 over 30 mm.
SLIVER_MM = 20.0
#: What the model reads as the agreement of a set of one template, whose boxes can only agree with
#: themselves (1.0 in the evidence): no second opinion, so a typical value, the median of the right
#: boxes' on the tuning scans (0.60), not a perfect one. One abdomen template on the dev scans had
#: a pancreas box at 0.41 with the 1.0 read as it is.
ONE_TEMPLATE_AGREEMENT = 0.60


def confidence_features(evidence: dict, n_templates: int) -> list[float]:
    """The model's inputs from a structure's evidence: the local alignment's similarity (median over
    the voting templates), the global one's, how well the templates' boxes agree inside the data,
    the share of the structure the scan shows, the share of templates that voted, and how far
    the box falls short of SLIVER_MM head-foot. Evidence written before the tenth session has
    neither the agreement inside the data nor the height: its whole-box agreement stands in,
    and no height counts as a sliver."""
    height = float(evidence.get("height_mm", SLIVER_MM))
    agreement = float(evidence.get("visible_agreement", evidence["agreement"]))
    return [float(evidence["match"]), float(evidence["global_match"]),
            ONE_TEMPLATE_AGREEMENT if n_templates == 1 else agreement,
            float(evidence["visible_fraction"]), evidence["templates_used"] / max(n_templates, 1),
            max(0.0, SLIVER_MM - height) / SLIVER_MM]


def confidence(evidence: dict, n_templates: int, settings: FusionSettings | None = None) -> float:
    """0..1: the calibrated probability that the box is right (FusionSettings.confidence_weights);
    with no weights, the old heuristic: how much the templates agree, how well the structure's
    neighbourhood matched, and how many templates could vote."""
    weights = (settings or FusionSettings()).confidence_weights
    if weights is None:
        match = float(np.clip((evidence["match"] - 0.2) / 0.6, 0.0, 1.0))
        return float(np.clip(evidence["agreement"], 0.0, 1.0) * (0.5 + 0.5 * match)
                     * (0.5 + 0.5 * evidence["templates_used"] / max(n_templates, 1)))
    z = weights[0] + float(np.dot(weights[1:], confidence_features(evidence, n_templates)))
    return float(1.0 / (1.0 + np.exp(-z)))
