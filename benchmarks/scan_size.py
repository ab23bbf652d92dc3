"""Seconds per case against scan size: the whole ``medlsam segment`` case (read the file,
localize, segment, write both outputs) for dev scans as stored (128^3) and resampled to a
clinical size (512 x 512 x 300 by default), with label-map and six-point templates, in one run.

Each size of each scan is written as an int16 ``.nii.gz`` first (as a scanner export would be);
the case is run once to warm up, then timed. Dice is against the contours resampled alike
(nearest), so that accuracy is seen to hold at the larger size; and again on the stored grid (the
output resampled back, nearest: the upsampled contours are blocky, a smooth mask cannot follow
them voxel for voxel), with the boxes' IoU against the contours' (grid-free).

    python benchmarks/scan_size.py --shared ../shared --limit 4 --repeat 3 --out docs/bench/scan_size
"""
from __future__ import annotations

import json
import time

import numpy as np

from MedLSAMLib.evaluate import _mask_box_lps
from MedLSAMLib.geometry import Geometry, box_iou
from MedLSAMLib.io import Volume, read_labels, write_volume
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.preprocess import resample
from MedLSAMLib.segment.backends import load_segmenter

from harness import Bench, arguments, machine, mean_max, points_only, structure_masks, table_head, write_results
from segmentation import mean_dice, scores

KINDS = ("labels", "points")
STAGES = ("read", "localize", "postprocess", "write", "total")
NOTE = ("{queries} dev scans; {machine}; each case run once before it is timed, then timed {repeat} time(s) "
        "(the run of median total kept); "
        "total = read + localize + segment + write (``segment_case``).")


def resized(volume, size, linear: bool):
    """``volume`` on a grid of ``size`` voxels over the same extent (int16 for CT, as exported)."""
    g = volume.geometry
    n = np.asarray(size)
    grid = Geometry(g.origin, g.spacing * (np.asarray(g.size) - 1) / np.maximum(n - 1, 1), g.direction,
                    tuple(int(v) for v in n))
    out = resample(volume, grid, linear=linear, default=0 if not linear else float(volume.array.min()))
    return out.with_array(np.rint(out.array).astype(np.int16) if linear else out.array.astype(np.uint8))


def main():
    ap = arguments(__doc__, "docs/bench/scan_size", limit=4)
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("I", "J", "K"))
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs per case and size (after the warm-up); the one of median total time is kept")
    args = ap.parse_args()
    bench = Bench(args, "size")
    label_dirs = bench.templates(folder="labels")
    dirs = {"labels": label_dirs, "points": [points_only(d, bench.work / "points" / d.name) for d in label_dirs]}
    segmenter = load_segmenter("litemedsam", device="cpu")
    cohorts = {k: CohortSegmenter(HybridLocalizer(dirs[k], cache_dir=None), segmenter) for k in KINDS}
    rows = []
    for case in bench.dev_cases():
        ct, labels = bench.case(case)
        for size_name, size in (("stored", None), ("large", args.size)):
            path = bench.work / size_name / f"{case.split('/')[-1]}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            truth = labels if size is None else resized(labels, size, linear=False)
            write_volume(ct.with_array(np.rint(ct.array).astype(np.int16)) if size is None
                         else resized(ct, size, linear=True), path)
            for kind in KINDS:
                out = bench.work / "out" / kind / size_name
                cohorts[kind].segment_case(path, out)  # warm-up: first-call costs are not the case's
                timed = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    result = cohorts[kind].segment_case(path, out)
                    timed.append((time.perf_counter() - t0, json.loads((out / f"{result.case}.json").read_text())))
                # the run of median total time: one slow moment of a shared machine does not decide
                wall, record = sorted(timed, key=lambda run: run[1]["timing_s"]["total"])[len(timed) // 2]
                pred = read_labels(out / f"{result.case}_labels.nii.gz").array
                # the same output judged on the stored grid (nearest): a large scan's contours are the
                # stored ones upsampled in blocks, which a smooth mask cannot follow voxel for voxel
                on_stored = pred if size is None else resample(Volume(pred, truth.geometry), labels.geometry,
                                                                linear=False, default=0).array
                rows.append({"case": case, "size": size_name, "voxels": list(truth.geometry.size), "kind": kind,
                             "wall_s": wall, "timing_s": record["timing_s"],
                             "dice": mean_dice(scores(truth, pred, truth.geometry.spacing[::-1])),
                             "dice_stored_grid": mean_dice(scores(labels, on_stored, labels.geometry.spacing[::-1])),
                             "box_iou": box_ious(record["structures"], labels)})
                print(f"{case} {size_name} {kind}: {wall:.1f} s, Dice {rows[-1]['dice']:.3f}", flush=True)
    meta = {"queries": len(bench.dev_cases()), "machine": machine(), "size": args.size, "repeat": args.repeat}
    write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta))


def box_ious(structures: dict, labels) -> float:
    """Mean box IoU of the reported boxes against the contours' boxes (LPS: the same whatever the grid)."""
    ious = [box_iou(np.array(structures[name]["box_lps"]), _mask_box_lps(mask, labels.geometry))
            for _, name, mask in structure_masks(labels)]
    return float(np.mean(ious))


def markdown(rows, meta) -> list[str]:
    lines = table_head(["scan", "templates hold", "cases", *[f"{s} s, mean (max)" for s in STAGES], "ratio to stored",
                        "mean Dice %", "Dice % on the stored grid", "box IoU %"])
    for size in ("stored", "large"):
        for kind in KINDS:
            mine = [r for r in rows if r["size"] == size and r["kind"] == kind]
            base = [r for r in rows if r["size"] == "stored" and r["kind"] == kind]
            ratio = np.mean([r["timing_s"]["total"] for r in mine]) / np.mean([r["timing_s"]["total"] for r in base])
            lines.append(f"| {'x'.join(map(str, mine[0]['voxels']))} ({size}) | {kind} | {len(mine)} | "
                         + " | ".join(mean_max([r["timing_s"].get(s, 0.0) for r in mine]) for s in STAGES)
                         + f" | {ratio:.2f} | {100 * np.mean([r['dice'] for r in mine]):.1f} | "
                         f"{100 * np.mean([r['dice_stored_grid'] for r in mine]):.1f} | "
                         f"{100 * np.mean([r['box_iou'] for r in mine]):.1f} |")
    return lines + ["", NOTE.format(**meta)]


if __name__ == "__main__":
    main()
