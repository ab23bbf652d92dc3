"""Segmentation quality and speed on held-out head-and-neck CTs (LiteMedSAM).

* MedLAM boxes (5 templates from ``support_candidates_core5``) vs the paper's "manual prompt"
  upper bound: a ground-truth box on every slice of the structure, each side pushed out by a
  random 0-20 px at the 1024 scale. Dice and HD95 per structure; empty predictions count as
  Dice 0.
* Speed on one case: seconds per case and per slice with the per-slice embedding cache and
  without it (one encoder pass per structure and slice, as the reference does); peak RSS.

    python benchmarks/segmentation.py --shared ../shared --limit 16 --out docs/bench/segmentation
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from MedLSAMLib.evaluate import dice, hd95
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.localize import TemplateLocalizer, set_cpu_threads
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.segment.backends import load_segmenter
from MedLSAMLib.segment.slices import SegmentOptions, StructureRequest, segment_volume

from hn_templates import CORE5, support_templates  # benchmarks/ is on sys.path when run as a script

PAPER_DSC = {"Brainstem": 73.3, "SpinalCord": 34.7, "RightParotid": 57.1, "LeftParotid": 59.6, "Mandible": 66.0}


def manual_prompt_requests(labels, rng) -> list[StructureRequest]:
    """Per-slice ground-truth boxes with 0-20 px (at 1024) jitter per side, axial slices (k)."""
    out = []
    h, w = labels.array.shape[1:]
    for value, name in CORE5:
        kji = np.argwhere(labels.array == value)
        boxes = []
        for k in np.unique(kji[:, 0]):
            sel = kji[kji[:, 0] == k]
            (_, j0, i0), (_, j1, i1) = sel.min(0), sel.max(0)
            jit = rng.integers(0, 21, 4) * np.array([w, h, w, h]) / 1024.0
            boxes.append([[int(max(0, i0 - jit[0])), int(max(0, j0 - jit[1])), int(k)],
                          [int(min(w - 1, i1 + jit[2])), int(min(h - 1, j1 + jit[3])), int(k)]])
        if boxes:
            out.append(StructureRequest(name, value, boxes))
    return out


def scores(labels, pred, spacing_kji) -> dict:
    out = {}
    for value, name in CORE5:
        g = labels.array == value
        if not g.any():
            continue
        p = pred == value
        out[name] = {"dice": dice(p, g), "hd95": hd95(p, g, spacing_kji)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--mode", default="wpl", choices=["wpl", "spl"])
    ap.add_argument("--speed-slices", type=int, default=0,
                    help="time the cache comparison on the first N slices of each box only (0 = all)")
    ap.add_argument("--out", default="docs/bench/segmentation")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an interrupted run (OUT.partial.json) and do only the cases it lacks")
    args = ap.parse_args()
    set_cpu_threads()
    hn = Path(args.shared) / "data" / "openkbp_hn"
    splits = json.loads((hn / "splits.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="medlsam-segbench-"))
    tdirs = support_templates(hn, splits, work)
    loc = TemplateLocalizer(tdirs, mode=args.mode, device="cpu")
    seg = load_segmenter("litemedsam", device="cpu")
    cohort = CohortSegmenter(loc, seg)
    rng = np.random.default_rng(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # rows so far, so a long run that dies can be read
    rows = json.loads(partial.read_text()) if args.resume and partial.is_file() else []
    rows = [r for r in rows if r["case"] in splits["dev_eval_core5"][: args.limit]]
    done = {r["case"] for r in rows}
    for n, case in enumerate(splits["dev_eval_core5"][: args.limit], 1):
        if case in done:
            continue
        ct = read_ct(hn / f"{case}_ct.nii.gz")
        labels = read_labels(hn / f"{case}_label.nii.gz")
        sp = labels.geometry.spacing[::-1]
        t0 = time.perf_counter()
        pred, record = cohort.segment_volume(ct)
        t_auto = time.perf_counter() - t0
        manual, _, _ = segment_volume(ct, manual_prompt_requests(labels, rng), seg, SegmentOptions(margin_px_at_1024=0))
        rows.append({"case": case, "medlam": scores(labels, pred, sp), "manual": scores(labels, manual, sp),
                     "seconds": t_auto, "slices": record["timing_s"]["slices"]})
        print(f"[{n}] {case}: {t_auto:.1f} s, MedLAM+LiteMedSAM mean Dice "
              f"{np.mean([v['dice'] for v in rows[-1]['medlam'].values()]):.3f}, manual prompt "
              f"{np.mean([v['dice'] for v in rows[-1]['manual'].values()]):.3f}", flush=True)
        partial.write_text(json.dumps(rows, indent=1))

    # speed: one case with and without the embedding cache
    ct = read_ct(hn / f"{splits['dev_eval_core5'][0]}_ct.nii.gz")
    res = loc.localize(ct)
    reqs = [StructureRequest(n, r["label"], r["sub_boxes_ijk"]) for n, r in res["structures"].items() if r["present"]]
    if args.speed_slices:  # axial axis of these files is k
        for r in reqs:
            r.boxes_ijk = [[b[0], [b[1][0], b[1][1], min(b[1][2], b[0][2] + args.speed_slices - 1)]] for b in r.boxes_ijk]
    speed = {}
    for cache in (True, False):
        t0 = time.perf_counter()
        _, _, timing = segment_volume(ct, reqs, seg, use_cache=cache)
        speed["cache" if cache else "no_cache"] = {"seconds": time.perf_counter() - t0, "slices": timing["slices"],
                                                   "encode_s": timing["encode"], "decode_s": timing["decode"]}
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    lines = ["| structure | MedLAM + LiteMedSAM Dice % | HD95 mm | manual prompt + LiteMedSAM Dice % | HD95 mm | paper MedLAM + MedSAM Dice % |",
             "|---|---|---|---|---|---|"]
    for _, name in CORE5:
        m = [r["medlam"][name] for r in rows if name in r["medlam"]]
        g = [r["manual"][name] for r in rows if name in r["manual"]]
        fmt = lambda xs, k: f"{np.nanmean([x[k] for x in xs]) * (100 if k == 'dice' else 1):.1f} ± {np.nanstd([x[k] for x in xs]) * (100 if k == 'dice' else 1):.1f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(m, 'dice')} | {fmt(m, 'hd95')} | {fmt(g, 'dice')} | {fmt(g, 'hd95')} | {PAPER_DSC[name]} |")
    c, nc = speed["cache"], speed["no_cache"]
    lines += ["", f"{len(rows)} queries, mode {args.mode}. Mean seconds per case (localize + segment, CPU): "
              f"{np.mean([r['seconds'] for r in rows]):.1f}.",
              "", "| segmentation of one case | seconds | slices | seconds per slice |", "|---|---|---|---|",
              f"| embedding cached per slice | {c['seconds']:.1f} | {c['slices']} | {c['seconds'] / max(c['slices'], 1):.2f} |",
              f"| one encoder pass per structure (reference) | {nc['seconds']:.1f} | {nc['slices']} | {nc['seconds'] / max(nc['slices'], 1):.2f} |",
              "", f"Peak RSS of this process: {peak_rss_mb:.0f} MB" + (" (a --resume run)." if args.resume else ".")]
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "speed": speed, "peak_rss_mb": peak_rss_mb}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    partial.unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
