"""Localization accuracy on held-out head-and-neck CTs: MedLAM vs an affine-registration baseline.

Supports: the first N cases of ``support_candidates_core5``; queries: ``dev_eval_core5``.
Per structure: 3D box IoU and wall distance (mm) against the ground-truth box, mean +- std,
and seconds per query on this machine. Writes JSON (per case) and a markdown table.

    python benchmarks/localization.py --shared ../shared --out docs/bench/localization
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from MedLSAMLib.geometry import box_from_points, box_iou, wall_distance
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.localize import TemplateLocalizer, set_cpu_threads
from MedLSAMLib.registration import localize_by_registration
from MedLSAMLib.templates import template_from_labels

CORE5 = [(1, "Brainstem"), (2, "SpinalCord"), (3, "RightParotid"), (4, "LeftParotid"), (7, "Mandible")]
# Paper, StructSeg HaN, 5-shot MedLAM (IoU %, as quoted in the issue): wall distance 2.4-4.0 mm.
PAPER_IOU = {"Brainstem": 70.3, "SpinalCord": 57.7, "RightParotid": 62.7, "LeftParotid": 63.1, "Mandible": 80.9}


def gt_box(labels, value):
    kji = np.argwhere(labels.array == value)
    return None if len(kji) == 0 else box_from_points(labels.geometry.ijk_to_lps(kji[:, ::-1].astype(float)))


def score(pred_structures, labels):
    out = {}
    for value, name in CORE5:
        gt = gt_box(labels, value)
        p = pred_structures[name]
        if gt is None:
            out[name] = {"gt_present": False, "pred_present": p.get("present", True)}
            continue
        out[name] = {"gt_present": True, "pred_present": p.get("present", True),
                     "iou": box_iou(p["box_lps"], gt), "wd_mm": wall_distance(p["box_lps"], gt),
                     "confidence": p.get("confidence")}
    return out


def summarize(per_case, method):
    rows = {}
    for _, name in CORE5:
        iou = [c[method][name]["iou"] for c in per_case if c[method][name].get("gt_present")]
        wd = [c[method][name]["wd_mm"] for c in per_case if c[method][name].get("gt_present")]
        rows[name] = {"iou_mean": float(np.mean(iou)), "iou_std": float(np.std(iou)),
                      "wd_mean": float(np.mean(wd)), "wd_std": float(np.std(wd)), "n": len(iou)}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--supports", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="MedLAM weights (default: shipped checkpoint)")
    ap.add_argument("--mode", default="wpl", choices=["wpl", "spl"])
    ap.add_argument("--limit", type=int, default=0, help="only the first N queries (0 = all)")
    ap.add_argument("--no-registration", action="store_true")
    ap.add_argument("--out", default="docs/bench/localization")
    args = ap.parse_args()
    set_cpu_threads()

    hn = Path(args.shared) / "data" / "openkbp_hn"
    splits = json.loads((hn / "splits.json").read_text())
    supports = splits["support_candidates_core5"][: args.supports]
    queries = splits["dev_eval_core5"][: args.limit or None]
    work = Path(tempfile.mkdtemp(prefix="medlsam-bench-"))
    tdirs = []
    for case in supports:
        d = work / Path(case).name
        template_from_labels(hn / f"{case}_ct.nii.gz", hn / f"{case}_label.nii.gz", CORE5, d)
        tdirs.append(d)

    loc = TemplateLocalizer(tdirs, mode=args.mode, checkpoint=args.checkpoint, device="cpu")
    reg_templates = [(t, t.load_image()) for t in loc.templates]
    per_case = []
    for n, case in enumerate(queries, 1):
        ct = read_ct(hn / f"{case}_ct.nii.gz")
        labels = read_labels(hn / f"{case}_label.nii.gz")
        t0 = time.perf_counter()
        res = loc.localize(ct)
        t_medlam = time.perf_counter() - t0
        row = {"case": case, "medlam": score(res["structures"], labels), "medlam_s": t_medlam}
        if not args.no_registration:
            t0 = time.perf_counter()
            reg = localize_by_registration(reg_templates, ct, [n_ for _, n_ in CORE5])
            row["registration"] = score(reg["structures"], labels)
            row["registration_s"] = time.perf_counter() - t0
        per_case.append(row)
        print(f"[{n}/{len(queries)}] {case}: MedLAM {t_medlam:.1f} s, mean IoU "
              f"{np.mean([v['iou'] for v in row['medlam'].values() if 'iou' in v]):.3f}"
              + (f"; registration {row['registration_s']:.1f} s, mean IoU "
                 f"{np.mean([v['iou'] for v in row['registration'].values() if 'iou' in v]):.3f}"
                 if "registration" in row else ""), flush=True)

    summary = {"medlam": summarize(per_case, "medlam")}
    if not args.no_registration:
        summary["registration"] = summarize(per_case, "registration")
    timing = {"medlam_setup_s": loc.setup_s, "medlam_per_query_s": float(np.mean([r["medlam_s"] for r in per_case]))}
    if not args.no_registration:
        timing["registration_per_query_s"] = float(np.mean([r["registration_s"] for r in per_case]))
    meta = {"supports": supports, "queries": queries, "mode": args.mode, "checkpoint": res["checkpoint"],
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "timing": timing}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "cases": per_case}, indent=1))

    lines = ["| structure | MedLAM IoU % | MedLAM WD mm | registration IoU % | registration WD mm | paper MedLAM IoU % |",
             "|---|---|---|---|---|---|"]
    for _, name in CORE5:
        m = summary["medlam"][name]
        r = summary.get("registration", {}).get(name)
        reg = f"{100 * r['iou_mean']:.1f} ± {100 * r['iou_std']:.1f} | {r['wd_mean']:.1f} ± {r['wd_std']:.1f}" if r else "- | -"
        lines.append(f"| {name} | {100 * m['iou_mean']:.1f} ± {100 * m['iou_std']:.1f} | "
                     f"{m['wd_mean']:.1f} ± {m['wd_std']:.1f} | {reg} | {PAPER_IOU[name]} |")
    mean_m = np.mean([summary["medlam"][n]["iou_mean"] for _, n in CORE5])
    lines.append(f"| **mean** | {100 * mean_m:.1f} | {np.mean([summary['medlam'][n]['wd_mean'] for _, n in CORE5]):.1f} | "
                 + (f"{100 * np.mean([summary['registration'][n]['iou_mean'] for _, n in CORE5]):.1f} | "
                    f"{np.mean([summary['registration'][n]['wd_mean'] for _, n in CORE5]):.1f}"
                    if "registration" in summary else "- | -") + f" | {np.mean(list(PAPER_IOU.values())):.1f} |")
    lines.append("")
    lines.append(f"Seconds per query (CPU, {meta['machine']}): MedLAM {timing['medlam_per_query_s']:.1f} "
                 f"(+ {timing['medlam_setup_s']:.1f} once for {len(supports)} templates)"
                 + (f", registration {timing['registration_per_query_s']:.1f}" if "registration_per_query_s" in timing else "")
                 + f". {len(queries)} queries, {len(supports)} supports, mode {args.mode}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
