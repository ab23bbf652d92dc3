"""Any field of view: the localizer on scans that show only part of the templates' region.

Hard cases built from each query scan (head-and-neck, five protocol templates with label maps):

* ``slab40`` / ``slab80`` / ``slab120``: a head-foot slab of that height, centred at a quarter,
  half and three quarters of the five structures' joint head-foot range (a neck scan, a
  parotid-region scan, a head-only scan);
* ``above`` / ``below``: the scan cut at a third and two thirds of that range, the part above
  (head) or below (neck) kept;
* ``full``: the scan as stored (the full-scan numbers must not get worse);
* ``abdomen``: the shared abdomen CT localized with the head-and-neck templates, and each query
  scan localized with an abdomen template (spleen, liver, stomach, pancreas from the shared
  abdomen CT's labels): nothing there is the templates' anatomy, so no box should be confident.

Per structure: the share of its contour the cut scan shows (truth), what the localizer reports
(present, visible fraction, confidence, evidence) and the box IoU against the box of the part
shown. Found: present with IoU >= 0.4. Confident-wrong: present, confidence >= 0.3, IoU < 0.2.

    python benchmarks/field_of_view.py --shared ../shared --out docs/bench/field_of_view
    python benchmarks/field_of_view.py --shared ../shared --scans other --out docs/bench/field_of_view_other

``--scans other``: 30 support candidates that are neither dev scans nor templates (where the
confidence is calibrated, so that dev stays a test). ``--arms`` compares settings in one run:
``NAME='{"hybrid": {...}, "fusion": {...}}'`` (default: the product's settings as ``default``).
``--templates labels points``: every arm with label-map templates and with the same templates
holding only their six points per structure (what the Slicer panel saves); the points arms are
named ``NAME/points``.
"""
from __future__ import annotations

import json
import time

import numpy as np

from MedLSAMLib.evaluate import _mask_box_lps
from MedLSAMLib.geometry import box_iou
from MedLSAMLib.io import Volume, read_ct
from MedLSAMLib.localizers.fusion import FusionSettings, confidence
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.localizers.prepared import HybridSettings
from MedLSAMLib.templates import template_from_labels

from harness import CORE5, Bench, add_scan_set_option, arguments, points_only, table_head, write_results

ABDOMEN = [(1, "Spleen"), (5, "Liver"), (6, "Stomach"), (7, "Pancreas")]  # TotalSegmentator label values
FOUND_IOU, WRONG_IOU, CONFIDENT = 0.4, 0.2, 0.3
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def hard_cases(ct: Volume, labels: Volume):
    """(kind, CT, labels) of every hard case built from one scan."""
    kji = np.argwhere(np.isin(labels.array, [v for v, _ in CORE5]))
    z = labels.geometry.ijk_to_lps(kji[:, ::-1].astype(float))[:, 2]
    lo, hi = float(z.min()), float(z.max())
    yield "full", ct, labels
    for height in (40, 80, 120):
        for at in (0.25, 0.5, 0.75):
            centre = lo + at * (hi - lo)
            yield f"slab{height}", *(v.head_foot_slab(centre - height / 2, centre + height / 2) for v in (ct, labels))
    for at in (1 / 3, 2 / 3):
        level = lo + at * (hi - lo)
        yield "above", *(v.head_foot_slab(level, 1e4) for v in (ct, labels))
        yield "below", *(v.head_foot_slab(-1e4, level) for v in (ct, labels))


def score(result, labels: Volume | None, full: Volume | None, structures) -> list[dict]:
    """One row per structure: truth (share shown, box of the part shown) against the result."""
    rows = []
    for value, name in structures:
        shown = labels is not None and bool((labels.array == value).any())
        share = float((labels.array == value).sum() / max((full.array == value).sum(), 1)) if shown else 0.0
        s = result.structures[name]
        truth = _mask_box_lps(labels.array == value, labels.geometry) if shown else None
        iou = box_iou(np.array(s.box_lps), truth) if shown else 0.0  # also when reported absent (thresholds)
        rows.append({"structure": name, "shown": share, "present": s.present, "confidence": s.confidence,
                     "iou": float(iou), "evidence": s.evidence, "templates": len(result.templates)})
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per kind: found / missed among structures half shown or more, confident-wrong boxes."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        half = [r for r in mine if r["shown"] >= 0.5]
        out[kind] = {"structures": len(mine), "half_shown": len(half),
                     "found": sum(r["present"] and r["iou"] >= FOUND_IOU for r in half),
                     "reported_absent": sum(not r["present"] for r in half),
                     "confident_wrong": sum(r["present"] and r["confidence"] >= CONFIDENT and r["iou"] < WRONG_IOU
                                            for r in mine),
                     "absent_reported_present": sum(r["present"] for r in mine if r["shown"] == 0)}
    return out


def flag_table(rows: list[dict]) -> list[dict]:
    """Per confidence threshold: wrong boxes (present, IoU < 0.2) flagged (confidence below it) and
    good boxes (IoU >= 0.4) falsely flagged."""
    present = [r for r in rows if r["present"]]
    wrong = [r for r in present if r["iou"] < WRONG_IOU]
    good = [r for r in present if r["iou"] >= FOUND_IOU]
    return [{"threshold": t, "wrong": len(wrong), "wrong_flagged": sum(r["confidence"] < t for r in wrong),
             "good": len(good), "good_flagged": sum(r["confidence"] < t for r in good)} for t in THRESHOLDS]


def main():
    ap = arguments(__doc__, "docs/bench/field_of_view")
    add_scan_set_option(ap, "--scans", "other", "the 16 dev scans")
    ap.add_argument("--arms", nargs="+", default=["default={}"], metavar="NAME=JSON")
    ap.add_argument("--kinds", nargs="+", help="only these case kinds (default: all)")
    ap.add_argument("--templates", nargs="+", choices=("labels", "points"), default=["labels"],
                    help="what the templates hold: label maps, six points per structure, or both")
    ap.add_argument("--rescore", metavar="RUN.json",
                    help="no localizing: that run's rows with each present structure's confidence recomputed "
                    "from its evidence by the product's model (after a refit), summarized again into --out")
    args = ap.parse_args()
    if args.rescore:
        return rescore(args.rescore, args.out)
    bench = Bench(args, "fov")
    cases = bench.dev_cases() if args.scans == "dev" else bench.other_cases()
    abdomen_dir = bench.shared_data("totalseg_abdomen")
    abd_ct, abd_labels = (abdomen_dir / "ts_abdpelvis_ct_3mm.nii.gz", abdomen_dir / "ts_abdpelvis_totalseg_labels_3mm.nii.gz")
    hn_dirs = bench.templates()
    abd_dir = template_from_labels(abd_ct, abd_labels, ABDOMEN, bench.work / "abdomen").directory
    held = {"labels": {"hn": hn_dirs, "abdomen": [abd_dir]}}
    if "points" in args.templates:
        held["points"] = {"hn": [points_only(d, bench.work / "points" / d.name) for d in hn_dirs],
                          "abdomen": [points_only(abd_dir, bench.work / "points" / "abdomen")]}
    arms, specs = {}, {}
    for spec in args.arms:
        name, _, text = spec.partition("=")
        conf = json.loads(text or "{}")
        for hold in args.templates:
            arm = name if hold == "labels" else f"{name}/points"
            specs[arm] = spec
            arms[arm] = {kind: HybridLocalizer(dirs, cache_dir=None, settings=HybridSettings(**conf.get("hybrid", {})),
                                               fusion=FusionSettings(**conf.get("fusion", {})))
                         for kind, dirs in held[hold].items()}
    rows, seconds = [], {a: [] for a in arms}
    wanted = set(args.kinds or [])

    def run(arm, kind, case, localizer, image, labels, full, structures):
        t0 = time.perf_counter()
        result = localizer.localize(image)
        seconds[arm].append(time.perf_counter() - t0)
        for r in score(result, labels, full, structures):
            rows.append({"arm": arm, "kind": kind, "case": case, **r})

    if not wanted or "abdomen" in wanted:
        abd = read_ct(abd_ct)
        for arm, loc in arms.items():
            run(arm, "abdomen", "ts_abdpelvis", loc["hn"], abd, None, None, CORE5)
    for case in cases:
        ct, labels = bench.case(case)
        for kind, cut_ct, cut_labels in hard_cases(ct, labels):
            if (wanted and kind not in wanted) or cut_ct is None:
                continue
            for arm, loc in arms.items():
                run(arm, kind, case, loc["hn"], cut_ct, cut_labels, labels, CORE5)
        if not wanted or "abdomen" in wanted:
            for arm, loc in arms.items():
                run(arm, "abdomen", case, loc["abdomen"], ct, None, None, ABDOMEN)
        done = [r for r in rows if r["case"] == case]
        print(case, " | ".join(f"{a}: found {sum(r['present'] and r['iou'] >= FOUND_IOU for r in done if r['arm'] == a and r['shown'] >= 0.5)}"
                                f"/{sum(r['shown'] >= 0.5 for r in done if r['arm'] == a)}, confident-wrong "
                                f"{sum(r['present'] and r['confidence'] >= CONFIDENT and r['iou'] < WRONG_IOU for r in done if r['arm'] == a)}"
                                for a in arms), flush=True)
    summary = {a: {"kinds": summarize([r for r in rows if r["arm"] == a]),
                   "flags": flag_table([r for r in rows if r["arm"] == a]),
                   "seconds_per_case": float(np.mean(seconds[a]))} for a in arms}
    write_results(args.out, {"arms": specs, "scans": args.scans, "templates": args.templates,
                             "queries": len(cases), "summary": summary, "rows": rows}, markdown(summary))


def rescore(run: str, out: str) -> None:
    """Rewrite ``run``'s summary with the confidences the product's model gives its rows' evidence
    (boxes, presence and IoU as localized; the confidence of the arm's settings at default fusion)."""
    data = json.loads(open(run).read())
    for r in data["rows"]:
        r["confidence"] = round(confidence(r["evidence"], r["templates"]), 4) if r["present"] else 0.0
    arms = list(data["summary"])
    data["summary"] = {a: {"kinds": summarize([r for r in data["rows"] if r["arm"] == a]),
                           "flags": flag_table([r for r in data["rows"] if r["arm"] == a]),
                           "seconds_per_case": data["summary"][a]["seconds_per_case"]} for a in arms}
    data["rescored_from"] = run
    write_results(out, data, markdown(data["summary"]))


def markdown(summary: dict) -> str:
    lines = []
    for arm, s in summary.items():
        lines += [f"**{arm}** ({s['seconds_per_case']:.1f} s per localization)", ""]
        lines += table_head(["case kind", "structures", "half or more shown", "found (IoU >= 0.4)", "reported absent",
                             "confident-wrong (>= 0.3, IoU < 0.2)", "not shown, reported present"])
        for kind, k in s["kinds"].items():
            pct = f" ({100 * k['found'] / k['half_shown']:.0f} %)" if k["half_shown"] else ""
            lines.append(f"| {kind} | {k['structures']} | {k['half_shown']} | {k['found']}{pct} | {k['reported_absent']} | "
                         f"{k['confident_wrong']} | {k['absent_reported_present']} |")
        lines += ["", "Confidence as a failure flag (present boxes; flagged = confidence below the threshold):", ""]
        lines += table_head(["threshold", "wrong boxes (IoU < 0.2) flagged", "good boxes (IoU >= 0.4) flagged"])
        for f in s["flags"]:
            lines.append(f"| {f['threshold']} | {f['wrong_flagged']} / {f['wrong']} | {f['good_flagged']} / {f['good']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
