"""What your templates hold -> what you get: segmentation of the 16 dev scans with the same five
templates holding label maps, or only their six points per structure (what the Slicer panel makes).

Arms (each is ``medlsam segment``'s own path, ``CohortSegmenter.segment_volume``; seconds real):

* ``labels``: label-map templates (``template from-labels``), default options: the ceiling.
* ``points``: the same templates with ``labels`` removed from ``template.json``; default options
  (each structure's mask made from its six points on the template's CT, carried onto the scan).
* ``labels_affine`` / ``points_affine``: as ``labels`` / ``points`` without the deformable
  refinement and weighted fusion (each template's mask carried by its affines, equal votes, cut at 0.5).
* ``points_sam``: points-only, masks from points turned off: LiteMedSAM per slice is all there
  is (the path before point masks): the floor.
* ``points_blend``: points-only, SAM blended half and half with the carried point masks.

    python benchmarks/template_kinds.py --shared ../shared --out docs/bench/template_kinds

``--in-plane N`` resamples every scan (and its contours, nearest) to N x N voxels in-plane over the
same extent (512: about 0.9 x 0.9 mm, an ordinary clinical size) before it is segmented.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from MedLSAMLib.geometry import Geometry
from MedLSAMLib.preprocess import resample
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.localizers.prepared import HybridSettings
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.segment.backends import load_segmenter
from MedLSAMLib.segment.slices import SegmentOptions

from harness import CORE5, Bench, add_scan_set_option, arguments, machine, mean_max, points_only, table_head, write_results
from segmentation import mean_dice, scores, structure_cells


ARMS = ("labels", "points", "labels_affine", "points_affine", "points_sam", "points_blend")


def in_plane(ct, labels, size: int):
    """The scan and its contours on a grid of ``size`` x ``size`` voxels in-plane, same extent and slices."""
    g = ct.geometry
    n = np.array([size, size, g.size[2]])
    extent = g.spacing * (np.asarray(g.size) - 1)
    grid = Geometry(g.origin, extent / np.maximum(n - 1, 1), g.direction, tuple(int(v) for v in n))
    big = resample(ct, grid, linear=True)
    big.array = big.array.astype(np.float32)
    return big, resample(labels, grid, linear=False, default=0)


def main():
    ap = arguments(__doc__, "docs/bench/template_kinds")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    add_scan_set_option(ap, "--scans", "other", "the 16 dev scans")
    ap.add_argument("--in-plane", type=int, default=0, help="resample each scan to N x N in-plane (0: as stored)")
    args = ap.parse_args()
    bench = Bench(args, "kinds")
    label_dirs = bench.templates(folder="labels")
    point_dirs = [points_only(d, bench.work / "points" / d.name) for d in label_dirs]
    seg = load_segmenter("litemedsam", device="cpu")
    defaults = SegmentOptions()
    setups = {"labels": (label_dirs, HybridSettings(), defaults),
              "points": (point_dirs, HybridSettings(), defaults),
              "labels_affine": (label_dirs, HybridSettings(refine=None), defaults),
              "points_affine": (point_dirs, HybridSettings(refine=None), defaults),
              "points_sam": (point_dirs, HybridSettings(point_masks=None), defaults),
              "points_blend": (point_dirs, HybridSettings(), replace(defaults, prior_weight=0.5))}
    cohorts, prepare_s = {}, {}
    for arm in args.arms:
        dirs, settings, options = setups[arm]
        t0 = time.perf_counter()
        localizer = HybridLocalizer(dirs, settings=settings, cache_dir=None)
        localizer.learn_thresholds()  # (leave-one-template-out, where the templates hold label maps)
        prepare_s[arm] = time.perf_counter() - t0
        cohorts[arm] = CohortSegmenter(localizer, seg, options)

    rows = []
    cases = bench.dev_cases() if args.scans == "dev" else bench.other_cases()
    for n, case in enumerate(cases, 1):
        ct, labels = bench.case(case)
        if args.in_plane:
            ct, labels = in_plane(ct, labels, args.in_plane)
        sp = labels.geometry.spacing[::-1]
        row = {"case": case, "arms": {}, "timing_s": {}}
        for arm, cohort in cohorts.items():
            pred, record = cohort.segment_volume(ct)
            row["arms"][arm] = scores(labels, pred, sp)
            row["timing_s"][arm] = record.timing_s
        rows.append(row)
        print(f"[{n}] {case}: " + ", ".join(f"{a} {mean_dice(s):.3f} ({row['timing_s'][a]['total']:.1f} s)"
                                             for a, s in row["arms"].items()), flush=True)
    meta = {"queries": len(rows), "machine": machine(), "prepare_templates_s": prepare_s,
            "scan_size": list(ct.geometry.size), "scan_spacing": np.round(ct.geometry.spacing, 3).tolist()}
    write_results(args.out, {"meta": meta, "rows": rows}, markdown(rows, meta))


def markdown(rows, meta) -> list[str]:
    arms = list(rows[0]["arms"])
    lines = table_head(["structure"] + [f"{a} Dice % / HD95 mm" for a in arms])
    for _, name in CORE5:
        lines.append(f"| {name} | " + " | ".join(structure_cells(rows, name, arms)) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * np.mean([mean_dice(r['arms'][a]) for r in rows]):.1f}**"
                                             for a in arms) + " |")
    lines.append("| s per case, mean (max) | " + " | ".join(
        mean_max([r['timing_s'][a]['total'] for r in rows]) for a in arms) + " |")
    lines.append("| template preparation s (5 templates, no cache) | " + " | ".join(
        f"{meta['prepare_templates_s'][a]:.1f}" for a in arms) + " |")
    lines += ["", f"{meta['queries']} queries of {meta.get('scan_size')} voxels (last; spacing {meta.get('scan_spacing')} mm); "
              f"{meta['machine']}; the case read once, outside the timings."]
    return lines


if __name__ == "__main__":
    main()
