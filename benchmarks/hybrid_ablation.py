"""Hybrid localizer settings on the dev set, stage by stage: one settings variant per run.

Same protocol as benchmarks/localization.py (5 supports, the 16 ``dev_eval_core5`` queries, box
IoU and wall distance in LPS mm); prints the global-only, local (median of all templates) and
final (consensus + fusion) boxes' scores and the signed face errors, and dumps every template's
boxes for offline fusion studies.

    python benchmarks/hybrid_ablation.py --shared ../shared '{"local_final_lr": 0.1}' --dump /tmp/lr.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from MedLSAMLib.geometry import box_from_points, box_iou, wall_distance
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.localizers.fusion import FusionSettings
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.localizers.prepared import HybridSettings

from harness import CORE5, Bench, add_scan_set_option, arguments  # benchmarks/ is on sys.path when run as a script

STAGES = ["global", "local", "final"]


def main():
    ap = arguments(__doc__, None)
    ap.add_argument("settings", nargs="?", default="{}", help="JSON of HybridSettings fields to change")
    ap.add_argument("--fusion", default="{}", help="JSON of FusionSettings fields to change")
    add_scan_set_option(ap, "--queries", "tune", "the 16 dev_eval_core5 cases")
    ap.add_argument("--first-template", type=int, default=0,
                    help="templates: support_candidates_core5[N:N+5] (default 0: the protocol's supports); "
                    "another set tells a bias of the method from one of these five templates (use N >= 35 with tune)")
    ap.add_argument("--dump", help="write every case's stages (per-template boxes, scores) here")
    args = ap.parse_args()
    bench = Bench(args, "ablation")
    hn = bench.hn
    tdirs = bench.templates(first=args.first_template)
    loc = HybridLocalizer(tdirs, cache_dir=None, settings=HybridSettings(**json.loads(args.settings)),
                          fusion=FusionSettings(**json.loads(args.fusion)))
    scores = {s: [] for s in STAGES}
    signed, dump, seconds = {}, [], []
    queries = bench.dev_cases() if args.queries == "dev" else bench.other_cases()
    if args.first_template and args.queries == "tune" and args.first_template < 35:
        ap.error("--first-template below 35 overlaps the tuning queries")
    for case in queries:
        ct, labels = read_ct(hn / f"{case}_ct.nii.gz"), read_labels(hn / f"{case}_label.nii.gz")
        t0 = time.perf_counter()
        result = loc.localize(ct, keep_stages=True)
        seconds.append(time.perf_counter() - t0)
        gts = {}
        for value, name in CORE5:
            kji = np.argwhere(labels.array == value)
            gt = gts[name] = box_from_points(labels.geometry.ijk_to_lps(kji[:, ::-1].astype(float)))
            for stage in STAGES:
                box = np.array(result.structures[name].box_lps if stage == "final" else result.stages[name][stage])
                scores[stage].append((name, box_iou(box, gt), wall_distance(box, gt)))
                if stage == "final":
                    signed.setdefault(name, []).append(np.concatenate([gt[0] - box[0], box[1] - gt[1]]))
        dump.append({"case": case, "stages": result.stages, "gt": {k: v.tolist() for k, v in gts.items()},
                     "final": {k: v.box_lps for k, v in result.structures.items()}})
        print(case, " ".join(f"{s} {np.mean([x[1] for x in scores[s][-5:]]):.3f}" for s in STAGES),
              f"{seconds[-1]:.1f} s", flush=True)
    print(f"settings {args.settings} fusion {args.fusion}")
    for stage in STAGES:
        per = {n: np.mean([x[1] for x in scores[stage] if x[0] == n]) for _, n in CORE5}
        print(f"{stage:7s} IoU {np.mean([x[1] for x in scores[stage]]):.4f} WD {np.mean([x[2] for x in scores[stage]]):.2f} "
              + " ".join(f"{n} {v:.3f}" for n, v in per.items()))
    for name, v in signed.items():
        print(f"{name:13s} face error mm (x_lo y_lo z_lo x_hi y_hi z_hi; + = larger) {np.round(np.mean(v, 0), 1)} "
              f"abs {np.round(np.mean(np.abs(v), 0), 1)}")
    print(f"seconds per query {np.mean(seconds):.2f} (templates prepared in {loc.setup_s:.1f} s)")
    if args.dump:
        Path(args.dump).write_text(json.dumps(dump))


if __name__ == "__main__":
    main()
