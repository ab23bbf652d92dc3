"""Where the masks' error is, and what choosing or weighting templates could give at most: on the
16 dev scans, both template kinds, the default pipeline.

Per structure:

* ``fused``: Dice of the mask ``medlsam segment`` writes.
* ``best single``: the oracle, Dice of the best single template's refined mask (cut at 0.5, in the
  same box), chosen per case and structure with the truth in view: what picking one template per
  structure could give at most.
* ``in-plane``: Dice over the slices both the truth and the mask hold (the shape's error);
  ``head-foot mm``: mean of the |superior| and |inferior| end differences (the extent's error).

    python benchmarks/mask_bounds.py --shared ../shared --out docs/bench/mask_bounds
"""
from __future__ import annotations

import numpy as np

from MedLSAMLib.evaluate import dice
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.segment.backends import load_segmenter

from harness import CORE5, Bench, arguments, points_only, table_head, write_results


class RecordingLocalizer(HybridLocalizer):
    """The hybrid localizer, keeping each structure's per-template refined masks of the last query."""

    def localize(self, *args, **kwargs):
        self.last_masks = {}
        return super().localize(*args, **kwargs)

    def _warped_masks(self, volume, pad, name, voters, local_maps, lo, hi, positions):
        masks, weights = super()._warped_masks(volume, pad, name, voters, local_maps, lo, hi, positions)
        self.last_masks[name] = (lo[::-1].copy(), masks)
        return masks, weights


def axial_split(pred: np.ndarray, truth: np.ndarray, spacing_kji) -> tuple[float, float]:
    """(Dice over the axial slices both hold, mean |end difference| head-foot in mm). Arrays [k, j, i]
    with k the head-foot axis (as the OpenKBP scans are stored)."""
    p_slices = np.flatnonzero(pred.any(axis=(1, 2)))
    t_slices = np.flatnonzero(truth.any(axis=(1, 2)))
    if len(p_slices) == 0 or len(t_slices) == 0:
        return 0.0, float("nan")
    both = np.intersect1d(p_slices, t_slices)
    in_plane = dice(pred[both], truth[both]) if len(both) else 0.0
    ends = (abs(p_slices[0] - t_slices[0]) + abs(p_slices[-1] - t_slices[-1])) / 2 * spacing_kji[0]
    return in_plane, float(ends)


def main():
    ap = arguments(__doc__, "docs/bench/mask_bounds")
    args = ap.parse_args()
    bench = Bench(args, "bounds")
    label_dirs = bench.templates(folder="labels")
    kinds = {"labels": label_dirs, "points": [points_only(d, bench.work / "points" / d.name) for d in label_dirs]}
    seg = load_segmenter("litemedsam", device="cpu")
    cohorts = {kind: CohortSegmenter(RecordingLocalizer(dirs, cache_dir=None), seg) for kind, dirs in kinds.items()}
    rows = []
    for n, case in enumerate(bench.dev_cases(), 1):
        ct, labels = bench.case(case)
        sp = labels.geometry.spacing[::-1]
        row = {"case": case}
        for kind, cohort in cohorts.items():
            pred, _ = cohort.segment_volume(ct)
            row[kind] = {}
            for value, name in CORE5:
                truth = labels.array == value
                if not truth.any():
                    continue
                mask = pred == value
                best = 0.0
                if name in cohort.localizer.last_masks:
                    offset, masks = cohort.localizer.last_masks[name]
                    block = tuple(slice(o, o + e) for o, e in zip(offset, masks[0].shape))
                    rest = truth.sum() - truth[block].sum()  # truth outside the box: missed by every template
                    for m in masks:
                        inside = m > 0.5
                        best = max(best, 2.0 * np.logical_and(inside, truth[block]).sum()
                                   / (inside.sum() + truth[block].sum() + rest))
                in_plane, ends = axial_split(mask, truth, sp)
                row[kind][name] = {"fused": dice(mask, truth), "best_single": best, "in_plane": in_plane,
                                   "head_foot_mm": ends}
        rows.append(row)
        print(f"[{n}] {case}: " + ", ".join(
            f"{k} fused {np.mean([v['fused'] for v in row[k].values()]):.3f} "
            f"oracle {np.mean([v['best_single'] for v in row[k].values()]):.3f}" for k in kinds), flush=True)
    write_results(args.out, {"rows": rows}, markdown(rows))


def markdown(rows) -> list[str]:
    lines = table_head(["structure", "kind", "fused Dice %", "best single template Dice % (oracle)",
                        "in-plane Dice %", "head-foot end error mm"])
    for kind in ("labels", "points"):
        for _, name in CORE5:
            vals = [r[kind][name] for r in rows if name in r[kind]]
            lines.append(f"| {name} | {kind} | {100 * np.mean([v['fused'] for v in vals]):.1f} | "
                         f"{100 * np.mean([v['best_single'] for v in vals]):.1f} | "
                         f"{100 * np.mean([v['in_plane'] for v in vals]):.1f} | "
                         f"{np.nanmean([v['head_foot_mm'] for v in vals]):.1f} |")
        allv = [v for r in rows for v in r[kind].values()]
        lines.append(f"| **mean** | {kind} | **{100 * np.mean([v['fused'] for v in allv]):.1f}** | "
                     f"**{100 * np.mean([v['best_single'] for v in allv]):.1f}** | "
                     f"{100 * np.mean([v['in_plane'] for v in allv]):.1f} | "
                     f"{np.nanmean([v['head_foot_mm'] for v in allv]):.1f} |")
    lines += ["", f"{len(rows)} dev scans, 5 templates of each kind, default settings; the oracle sees the truth."]
    return lines


if __name__ == "__main__":
    main()
