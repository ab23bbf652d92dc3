"""How many templates: segmentation and box accuracy on the 16 dev scans against the number of
templates (the first K support candidates), for label-map and six-point templates.

Each configuration is ``medlsam segment``'s own path (``CohortSegmenter.segment_volume``) with the
default settings; box IoU is the localized box against the contour's box (LPS, voxel centres).

    python benchmarks/template_count.py --shared ../shared --out docs/bench/template_count
"""
from __future__ import annotations

import numpy as np

from MedLSAMLib.evaluate import _mask_box_lps, dice
from MedLSAMLib.geometry import box_iou
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.segment.backends import load_segmenter

from harness import CORE5, Bench, arguments, machine, points_only, structure_masks, table_head, write_results

KINDS = ("labels", "points")


def main():
    ap = arguments(__doc__, "docs/bench/template_count")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 3, 5, 10])
    args = ap.parse_args()
    bench = Bench(args, "count")
    label_dirs = bench.templates(max(args.counts))
    dirs = {"labels": label_dirs, "points": [points_only(d, bench.work / "points" / d.name) for d in label_dirs]}
    segmenter = load_segmenter("litemedsam", device="cpu")
    cases = [(case, *bench.case(case)) for case in bench.dev_cases()]
    rows = []
    for kind in KINDS:
        for count in args.counts:
            cohort = CohortSegmenter(HybridLocalizer(dirs[kind][:count], cache_dir=str(bench.work / "cache")),
                                     segmenter)
            scores = {name: {"dice": [], "iou": []} for _, name in CORE5}
            seconds = []
            for case, ct, labels in cases:
                pred, record = cohort.segment_volume(ct)
                seconds.append(record.timing_s["total"])
                for value, name, truth in structure_masks(labels):
                    scores[name]["dice"].append(dice(pred == value, truth))
                    found = record.structures[name]
                    scores[name]["iou"].append(box_iou(np.array(found.box_lps), _mask_box_lps(truth, labels.geometry))
                                               if found.present else 0.0)
            row = {"kind": kind, "templates": count, "seconds": float(np.mean(seconds)),
                   "structures": {n: {k: float(np.mean(v)) for k, v in s.items()} for n, s in scores.items()}}
            row["dice"] = float(np.mean([s["dice"] for s in row["structures"].values()]))
            row["iou"] = float(np.mean([s["iou"] for s in row["structures"].values()]))
            rows.append(row)
            print(f"{kind} x {count}: Dice {100 * row['dice']:.1f} %, box IoU {100 * row['iou']:.1f} %, "
                  f"{row['seconds']:.1f} s per case", flush=True)
    write_results(args.out, {"machine": machine(), "queries": len(cases), "rows": rows}, markdown(rows, len(cases)))


def markdown(rows, queries) -> list[str]:
    counts = sorted({r["templates"] for r in rows})
    lines = table_head(["templates hold"] + [f"{k} templates: Dice % / box IoU %" for k in counts])
    for kind in KINDS:
        cells = {r["templates"]: f"{100 * r['dice']:.1f} / {100 * r['iou']:.1f}" for r in rows if r["kind"] == kind}
        lines.append(f"| {kind} | " + " | ".join(cells.get(k, "-") for k in counts) + " |")
    for kind in KINDS:
        cells = {r["templates"]: f"{r['seconds']:.1f}" for r in rows if r["kind"] == kind}
        lines.append(f"| {kind}: s per case | " + " | ".join(cells.get(k, "-") for k in counts) + " |")
    lines += ["", f"{queries} dev queries; templates: the first K of support_candidates_core5 (the protocol's "
              "five are the first five); mean over the five structures."]
    return lines


if __name__ == "__main__":
    main()
