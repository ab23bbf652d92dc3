"""Masks made from six extreme points on the scan where they lie, against the clinical contours.

For each of the 16 dev scans and the 5 protocol templates, and each of the five head-and-neck
structures: the six extreme points of the contour (as ``template from-labels`` makes them, i.e.
exact points), then a mask from them alone, compared with the contour. Arms: the points' box,
an ellipsoid inscribed in it, and ``point_masks.mask_from_points`` (the product's maker).

    python benchmarks/point_masks.py --shared ../shared --out docs/bench/point_masks
"""
from __future__ import annotations

import json
import time

import numpy as np

from MedLSAMLib.evaluate import dice
from MedLSAMLib.point_masks import PointMaskSettings, mask_from_points, mask_on_image
from MedLSAMLib.templates import extreme_points_from_mask

from harness import CORE5, Bench, add_scan_set_option, arguments, structure_masks, table_head, write_results


def simple_arm(shape, geometry, points_lps, kind: str) -> np.ndarray:
    kji = geometry.lps_to_ijk(points_lps)[:, ::-1]
    lo, hi = kji.min(0), kji.max(0)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(float)
    if kind == "box":
        return np.all((grid >= np.floor(lo)) & (grid <= np.ceil(hi)), -1)
    centre, radius = (lo + hi) / 2, np.maximum((hi - lo) / 2, 0.5)
    return (((grid - centre) / radius) ** 2).sum(-1) <= 1


def main():
    ap = arguments(__doc__, "docs/bench/point_masks")
    add_scan_set_option(ap, "--scans", "other",
                        "the 16 dev scans and the 5 protocol templates (where the maker's settings were chosen)")
    ap.add_argument("--settings", default="{}", help="JSON of PointMaskSettings fields to change")
    args = ap.parse_args()
    bench = Bench(args, "pointmasks")
    cases = (bench.splits["dev_eval_core5"] + bench.splits["support_candidates_core5"][:5] if args.scans == "dev"
             else bench.other_cases())[: args.limit or None]
    settings = PointMaskSettings(**json.loads(args.settings))
    rows, seconds = [], []
    for case in cases:
        ct, labels = bench.case(case)
        for _, name, truth in structure_masks(labels):
            points = extreme_points_from_mask(truth, labels.geometry)
            t0 = time.perf_counter()
            block, matrix = mask_from_points(ct, points, settings)
            seconds.append(time.perf_counter() - t0)
            made = mask_on_image(block, matrix, ct.geometry)
            rows.append({"case": case, "structure": name,
                         "dice": {"box": dice(simple_arm(truth.shape, ct.geometry, points, "box"), truth),
                                  "ellipsoid": dice(simple_arm(truth.shape, ct.geometry, points, "ellipsoid"), truth),
                                  "point_mask": dice(made, truth)}})
        print(f"{case}: " + ", ".join(f"{r['structure']} {r['dice']['point_mask']:.2f}" for r in rows if r["case"] == case),
              flush=True)
    arms = ["box", "ellipsoid", "point_mask"]
    lines = table_head(["structure"] + [f"{a} Dice %" for a in arms])
    for _, name in CORE5:
        sel = [r for r in rows if r["structure"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{100 * np.mean([r['dice'][a] for r in sel]):.1f}" for a in arms) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"**{100 * np.mean([np.mean([r['dice'][a] for r in rows if r['structure'] == n]) for _, n in CORE5]):.1f}**"
        for a in arms) + " |")
    lines += ["", f"{len(cases)} scans, {len(rows)} structures; point mask {np.mean(seconds):.2f} s per structure "
              f"(max {np.max(seconds):.2f} s); settings {settings.key()}"]
    write_results(args.out, {"settings": settings.key(), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
