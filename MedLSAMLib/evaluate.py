"""Compare ``medlsam segment`` outputs with reference label maps.

Per case and structure: Dice, HD95 (mm; surfaces = mask XOR its 6-connected erosion, directed
distances pooled, 95th percentile), box IoU and wall distance (mm) of the MedLAM box against
the reference box. An empty prediction counts as Dice 0 and is never dropped (the reference
implementation silently skips such cases); its HD95 is undefined and counted separately.
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .geometry import box_from_points, box_iou, radiological_axial, wall_distance
from .io import atomic_path, read_labels, read_volume, write_text_atomic
from .results import CaseRecord


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = int(pred.sum()) + int(gt.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / s


def hd95(pred: np.ndarray, gt: np.ndarray, spacing_kji) -> float:
    """95th percentile of pooled surface distances in mm; NaN if either mask is empty."""
    if not pred.any() or not gt.any():
        return math.nan
    both = np.argwhere(pred | gt)
    lo, hi = np.maximum(both.min(0) - 1, 0), both.max(0) + 2
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, g = pred[crop], gt[crop]
    st = ndimage.generate_binary_structure(3, 1)
    ps = p ^ ndimage.binary_erosion(p, st, border_value=0)
    gs = g ^ ndimage.binary_erosion(g, st, border_value=0)
    dt_g = ndimage.distance_transform_edt(~gs, sampling=spacing_kji)
    dt_p = ndimage.distance_transform_edt(~ps, sampling=spacing_kji)
    return float(np.percentile(np.concatenate([dt_g[ps], dt_p[gs]]), 95))


def _mask_box_lps(mask: np.ndarray, geometry):
    kji = np.argwhere(mask)
    return None if len(kji) == 0 else box_from_points(geometry.ijk_to_lps(kji[:, ::-1].astype(float)))


def _read_record(path: Path) -> CaseRecord | None:
    """A finished case's record; None for a case that did not finish (its status is not ok)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable case record ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("status") != "ok":
        return None
    try:
        return CaseRecord.from_json(data)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: not a MedLSAM case record (fields are missing)") from None


def evaluate(pred_dir, labels_dir, labels_pattern: str = "{case}_label.nii.gz", case_suffix: str = "",
             out_dir=None, montage_cases: int = 4) -> list[dict]:
    pred_dir, labels_dir = Path(pred_dir), Path(labels_dir)
    out_dir = Path(out_dir) if out_dir else pred_dir / "evaluation"
    records = sorted(pred_dir.glob("*.json"))
    records = [r for r in records if r.name != "summary.json"]
    if not records:
        raise InputError(f"{pred_dir}: no case results (*.json) found; run 'medlsam segment' first")
    rows, shown = [], []
    for rec_path in records:
        rec = _read_record(rec_path)
        if rec is None:
            continue
        case = rec.case
        key = case[: -len(case_suffix)] if case_suffix and case.endswith(case_suffix) else case
        gt_path = labels_dir / labels_pattern.format(case=key)
        if not gt_path.exists():
            raise InputError(f"{gt_path}: reference label map for case {case} not found (see --labels-pattern)")
        gt = read_labels(gt_path)
        pred = read_labels(pred_dir / rec.outputs["labels"])
        if not gt.geometry.is_close(pred.geometry, atol=1e-3):
            raise InputError(f"{gt_path}: grid differs from the prediction for {case}")
        spacing_kji = gt.geometry.spacing[::-1]
        for name, s in rec.structures.items():
            g = gt.array == s.label
            p = pred.array == s.label
            gt_box = _mask_box_lps(g, gt.geometry)
            row = {"case": case, "structure": name, "label": s.label, "gt_voxels": int(g.sum()),
                   "pred_voxels": int(p.sum()), "present_pred": s.present, "confidence": s.confidence}
            if gt_box is None and not p.any():
                row.update(dice=math.nan, hd95_mm=math.nan, box_iou=math.nan, wall_mm=math.nan, note="absent in both")
            else:
                row.update(dice=dice(p, g), hd95_mm=hd95(p, g, spacing_kji))
                if gt_box is not None and s.present:
                    row.update(box_iou=box_iou(s.box_lps, gt_box), wall_mm=wall_distance(s.box_lps, gt_box))
                else:
                    row.update(box_iou=0.0 if gt_box is not None else math.nan, wall_mm=math.nan)
                row["note"] = "empty prediction" if not p.any() else ("structure absent in reference" if gt_box is None else "")
            rows.append(row)
        if len(shown) < montage_cases:
            shown.append((case, rec, gt, pred))
    write_reports(rows, out_dir)
    if shown:
        _montage(out_dir / "montage.png", shown)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["structure"] for r in rows):
        rs = [r for r in rows if r["structure"] == name and not math.isnan(r["dice"])]
        d = [r["dice"] for r in rs]
        h = [r["hd95_mm"] for r in rs if not math.isnan(r["hd95_mm"])]
        b = [r["box_iou"] for r in rs if not math.isnan(r.get("box_iou", math.nan))]
        out[name] = {"n": len(rs), "dice_mean": float(np.mean(d)) if d else math.nan,
                     "dice_std": float(np.std(d)) if d else math.nan,
                     "hd95_mean": float(np.mean(h)) if h else math.nan, "hd95_std": float(np.std(h)) if h else math.nan,
                     "box_iou_mean": float(np.mean(b)) if b else math.nan,
                     "empty": sum(r["pred_voxels"] == 0 for r in rs)}
    return out


def _pm(mean: float, std: float, scale: float = 1.0) -> str:
    return "-" if math.isnan(mean) else f"{scale * mean:.1f} ± {scale * std:.1f}"


def markdown_table(summary: dict) -> str:
    lines = ["| structure | n | Dice % | HD95 mm | box IoU % | empty predictions |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        box = "-" if math.isnan(s["box_iou_mean"]) else f"{100 * s['box_iou_mean']:.1f}"
        lines.append(f"| {name} | {s['n']} | {_pm(s['dice_mean'], s['dice_std'], 100)} | "
                     f"{_pm(s['hd95_mean'], s['hd95_std'])} | {box} | {s['empty']} |")
    return "\n".join(lines) + "\n"


def write_reports(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["case", "structure", "label", "dice", "hd95_mm", "box_iou", "wall_mm", "gt_voxels", "pred_voxels",
              "present_pred", "confidence", "note"]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out_dir / "metrics.csv", buf.getvalue())
    summary = summarize(rows)
    write_text_atomic(out_dir / "metrics.md", markdown_table(summary))
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    _boxplots(out_dir / "boxplots.png", rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _boxplots(path: Path, rows: list[dict]) -> None:
    plt = _plt()
    names = list(dict.fromkeys(r["structure"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names)) * 2, 4))
    for ax, key, title in ((axes[0], "dice", "Dice"), (axes[1], "hd95_mm", "HD95 (mm)")):
        data = [[r[key] for r in rows if r["structure"] == n and not math.isnan(r[key])] for n in names]
        ax.boxplot([d if d else [math.nan] for d in data], tick_labels=names, showmeans=True)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _montage(path: Path, shown) -> None:
    """One axial slice per case in radiological orientation (anterior up, patient's right on the
    left): reference contours solid, prediction dashed."""
    plt = _plt()
    fig, axs = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4.2), squeeze=False)
    for ax_plot, (case, rec, gt, pred) in zip(axs[0], shown):
        ax = gt.geometry.axial_axis
        fg = np.argwhere(gt.array > 0)
        s = int(np.median(fg[:, 2 - ax])) if len(fg) else gt.geometry.size[ax] // 2
        view = partial(radiological_axial, geometry=gt.geometry, index=s)
        try:
            ct = read_volume(rec.image).array
            ax_plot.imshow(np.clip(view(ct), -200, 300), cmap="gray")
        except Exception:  # the CT may have moved; contours alone still tell the story
            ax_plot.imshow(np.zeros(view(gt.array).shape), cmap="gray")
        g2, p2 = view(gt.array), view(pred.array)
        fg2 = np.argwhere((g2 > 0) | (p2 > 0))
        if len(fg2):  # zoom on the structures
            (r0, c0), (r1, c1) = fg2.min(0) - 12, fg2.max(0) + 12
            ax_plot.set_xlim(max(c0, 0) - 0.5, min(c1, g2.shape[1] - 1) + 0.5)
            ax_plot.set_ylim(min(r1, g2.shape[0] - 1) + 0.5, max(r0, 0) - 0.5)
        handles = []
        for n, (name, st) in enumerate(rec.structures.items()):
            color = f"C{n % 10}"
            g3, p3 = gt.array == st.label, pred.array == st.label
            score = f"Dice {dice(p3, g3):.2f}" if g3.any() else "not in reference"
            handles.append(plt.Line2D([], [], color=color, label=f"{name}: {score}"))
            if (g2 == st.label).any():
                ax_plot.contour(g2 == st.label, levels=[0.5], colors=[color], linewidths=1.2)
            if (p2 == st.label).any():
                ax_plot.contour(p2 == st.label, levels=[0.5], colors=[color], linewidths=1.2, linestyles="--")
        ax_plot.set_title(f"{case} slice {s} (R | L, anterior up)\nreference solid, MedLSAM dashed", fontsize=8)
        ax_plot.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=6,
                       framealpha=0.7)  # Dice of the whole 3D mask; below the picture, not over it
        ax_plot.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")  # the legends sit below the axes
    plt.close(fig)
