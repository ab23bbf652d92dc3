"""The deformable refinement's settings, one at a time, on the tuning scans (never dev): mean Dice
and HD95 of ``medlsam segment``'s own path for each variant of ``RefineSettings``, both template
kinds, the same localization for every variant (only the masks change).

    python benchmarks/refine_settings.py --shared ../shared --limit 8 --out docs/bench/refine_settings
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.localizers.prepared import HybridSettings
from MedLSAMLib.localizers.refine import RefineSettings
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.segment.backends import load_segmenter

from harness import CORE5, Bench, arguments, points_only, table_head, write_results
from segmentation import mean_dice, scores

#: name -> changes to the defaults (None: no refinement, the affinely carried masks averaged)
VARIANTS = {
    "default": {},
    "no learning": {"learn_thresholds": False},
    "affine": None,
    "threshold 0.5": {"learn_thresholds": False, "threshold": 0.5},
    "threshold 0.3": {"learn_thresholds": False, "threshold": 0.3},
    "equal weights": {"similarity_hu": 1e6},
    "similarity 30 HU": {"similarity_hu": 30.0},
    "similarity 60 HU": {"similarity_hu": 60.0},
    "similarity 240 HU": {"similarity_hu": 240.0},
    "no outlier rule": {"outlier_mad": 1e9},
    "field 1.0 mm": {"field_sigma_mm": 1.0},
    "field 2.5 mm": {"field_sigma_mm": 2.5},
    "field 4 mm": {"field_sigma_mm": 4.0},
    "30 iterations": {"iterations": 30},
    "120 iterations": {"iterations": 120},
    "margin 25 mm": {"margin_mm": 25.0},
}
#: the settings that act when the templates are loaded (leave-one-template-out): a localizer each
LEARNING = ("learn_thresholds",)


def variant_settings(name: str) -> RefineSettings | None:
    change = VARIANTS[name]
    return None if change is None else replace(RefineSettings(), **change)


def learning_of(name: str) -> tuple:
    settings = variant_settings(name) or replace(RefineSettings(), learn_thresholds=False)  # affine: none learned
    return tuple(getattr(settings, f) for f in LEARNING)


def main():
    ap = arguments(__doc__, "docs/bench/refine_settings", limit=8)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    bench = Bench(args, "refine")
    label_dirs = bench.templates(folder="labels")
    kinds = {"labels": label_dirs, "points": [points_only(d, bench.work / "points" / d.name) for d in label_dirs]}
    seg = load_segmenter("litemedsam", device="cpu")
    cohorts = {}  # (kind, learning settings) -> a cohort runner whose localizer learned with them
    for kind, dirs in kinds.items():
        for learning in sorted({learning_of(v) for v in args.variants}):
            settings = HybridSettings(refine=replace(RefineSettings(), **dict(zip(LEARNING, learning))))
            cohorts[(kind, learning)] = CohortSegmenter(HybridLocalizer(dirs, settings=settings,
                                                                        cache_dir=bench.work / "cache"), seg)
    learned = {f"{kind}/{learning}": c.localizer.learn_thresholds() for (kind, learning), c in cohorts.items()}
    rows = []
    for n, case in enumerate(bench.other_cases(), 1):
        ct, labels = bench.case(case)
        sp = labels.geometry.spacing[::-1]
        row = {"case": case, "scores": {}, "seconds": {}}
        for kind in kinds:
            for name in args.variants:
                cohort = cohorts[(kind, learning_of(name))]
                base = cohort.localizer.settings
                cohort.localizer.settings = replace(base, refine=variant_settings(name))
                t0 = time.perf_counter()
                pred, _ = cohort.segment_volume(ct)
                row["seconds"][f"{kind}/{name}"] = time.perf_counter() - t0
                row["scores"][f"{kind}/{name}"] = scores(labels, pred, sp)
                cohort.localizer.settings = base
        rows.append(row)
        print(f"[{n}] {case}: " + ", ".join(f"{k} {mean_dice(s):.3f}" for k, s in row["scores"].items()
                                             if k.endswith(("/default", "/affine"))), flush=True)
    write_results(args.out, {"rows": rows, "learned": learned}, markdown(rows, args.variants))


def markdown(rows, variants) -> list[str]:
    lines = table_head(["variant", "labels Dice %", "labels HD95 mm (4 structures)", "points Dice %",
                        "points HD95 mm (4 structures)", "s per case (points)"])
    short = [name for _, name in CORE5 if name != "SpinalCord"]
    for v in variants:
        cells = []
        for kind in ("labels", "points"):
            key = f"{kind}/{v}"
            cells.append(f"{100 * np.mean([mean_dice(r['scores'][key]) for r in rows]):.1f}")
            hd = [r["scores"][key][s]["hd95"] for r in rows for s in short
                  if s in r["scores"][key] and r["scores"][key][s].get("hd95") is not None]
            cells.append(f"{np.mean(hd):.1f}" if hd else "-")
        cells.append(f"{np.mean([r['seconds'][f'points/{v}'] for r in rows]):.1f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", f"{len(rows)} tuning scans (support_candidates_core5[5:], never dev), 5 templates, one localization "
              "per case and kind shared by every variant."]
    return lines


if __name__ == "__main__":
    main()
