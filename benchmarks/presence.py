"""Presence on cropped scans: misses and false boxes of the hybrid localizer per threshold.

Every ``dev_eval_core5`` query is cut 4 slices below its brainstem (the brainstem leaves the
scan, the parotids and mandible are partly cut) and localized with the 5 support templates.
Truth: a structure is in the scan when at least one voxel of its contour is left. Prediction at
threshold t: at least t of the fused box lies in the scan's data (``inside_fraction``).

    cd benchmarks && ../.venv/bin/python presence.py --shared ../../shared --out ../docs/bench/presence.json
"""
from __future__ import annotations


from MedLSAMLib.localizers.hybrid import HybridLocalizer

from harness import CORE5, Bench, arguments, write_results  # benchmarks/ is on sys.path when run as a script
from localization import crop_below_brainstem

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)


def main():
    args = arguments(__doc__, "docs/bench/presence").parse_args()
    bench = Bench(args, "presence")
    loc = HybridLocalizer(bench.templates(), cache_dir=None)
    rows = []
    for case in bench.dev_cases():
        ct, labels = bench.case(case)
        cropped_ct, cropped_labels = crop_below_brainstem(ct, labels)
        found = loc.localize(cropped_ct).structures
        for value, name in CORE5:
            rows.append({"case": case, "structure": name, "voxels_left": int((cropped_labels.array == value).sum()),
                         "voxels": int((labels.array == value).sum()), "inside_fraction": found[name].evidence["inside_fraction"]})
        print(case, flush=True)
    table = []
    for t in THRESHOLDS:
        truth = [r["voxels_left"] > 0 for r in rows]
        pred = [r["inside_fraction"] >= t for r in rows]
        table.append({"threshold": t, "in_scan": sum(truth), "cut_out": len(rows) - sum(truth),
                      "missed": sum(a and not b for a, b in zip(truth, pred)),
                      "false_boxes": sum(b and not a for a, b in zip(truth, pred))})
        print(table[-1])
    write_results(args.out, {"thresholds": table, "rows": rows})


if __name__ == "__main__":
    main()
