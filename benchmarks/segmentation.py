"""Segmentation quality and speed on the 16 held-out head-and-neck CTs (LiteMedSAM).

Same 5 templates (the first support candidates) and the default hybrid localizer for every arm;
every arm sees the same localization of a case.

* ``pipeline``: ``medlsam segment``'s own path (``CohortSegmenter.segment_case``: localize,
  segment, write the three files) with the default options; seconds by stage from its
  ``<case>.json``. Its label map, read back from disk, is scored.
* ``shape k=K``: per-slice prompts from the localized shape, every K-th slice encoded (the
  curve of Dice against K); ``box k=D``: the 3D box's footprint on every slice (the old prompt)
  at the default step D.
* ``prior W k=D``: SAM's probability blended with the localizer's shape prior (weight W; W=1:
  the prior alone, no encoder call).
* ``manual`` (``--manual``): the paper's upper bound, a ground-truth box on every slice of the structure, each
  side pushed out by a random 0-20 px at the 1024 scale, every slice encoded.

Dice and HD95 per structure (an empty prediction counts as Dice 0). Arms after the first reuse
the first's embeddings and masks where their slices and prompts coincide (CachingSegmenter):
only the pipeline arm's seconds are measured; the others' cost is given by slices encoded. Resumable: rows are kept in
``OUT.partial.json`` and ``--resume`` does only the cases missing there.

    python benchmarks/segmentation.py --shared ../shared --out docs/bench/segmentation
"""
from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from MedLSAMLib.evaluate import dice, hd95
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.localizers import LocalizerSpec
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.results import Localization
from MedLSAMLib.segment import RUNTIMES
from MedLSAMLib.preprocess import SAM_WINDOW
from MedLSAMLib.segment.backends import load_segmenter
from MedLSAMLib.segment.slices import SegmentOptions, StructureRequest, segment_volume

from harness import CORE5, Bench, arguments, machine, mean_max, table_head, write_results  # benchmarks/ is on sys.path when run as a script

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


def localized_requests(localization: Localization, prompt: str) -> list[StructureRequest]:
    return [StructureRequest(name, r.label, r.prompt_boxes(prompt), SAM_WINDOW, localization.priors.get(name))
            for name, r in localization.structures.items() if r.present]


class CachingSegmenter:
    """A segmenter whose slices are encoded once and whose (slice, boxes) are decoded once per case,
    so that the arms of a case pay only for the slices and prompts that are new to them. The
    pipeline arm runs first on an empty cache: its timings are real; the other arms' are not."""

    def __init__(self, segmenter):
        self.segmenter, self.device = segmenter, segmenter.device
        self.embeddings, self.masks = {}, {}

    def reset(self):
        self.embeddings.clear()
        self.masks.clear()

    def embed(self, images):
        keys = [hashlib.sha1(np.ascontiguousarray(im).tobytes() + str(np.shape(im)).encode()).hexdigest() for im in images]
        missing = [n for n, k in enumerate(keys) if k not in self.embeddings]
        if missing:
            for n, e in zip(missing, self.segmenter.embed([images[n] for n in missing])):
                self.embeddings[keys[n]] = e
        return [(k, self.embeddings[k]) for k in keys]

    def decode(self, item, boxes, shape):
        key, embedding = item
        mkey = (key, tuple(tuple(int(v) for v in b) for b in boxes), tuple(shape))
        if mkey not in self.masks:
            self.masks[mkey] = self.segmenter.decode(embedding, boxes, shape)
        return self.masks[mkey]

    def describe(self):
        return self.segmenter.describe()


def scores(labels, pred, spacing_kji) -> dict:
    out = {}
    for value, name in CORE5:
        g = labels.array == value
        if not g.any():
            continue
        p = pred == value
        out[name] = {"dice": dice(p, g), "hd95": hd95(p, g, spacing_kji)}
    return out


def mean_dice(arm_scores: dict) -> float:
    return float(np.mean([v["dice"] for v in arm_scores.values()]))


def main():
    ap = arguments(__doc__, "docs/bench/segmentation")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4], help="slice steps of the curve")
    ap.add_argument("--prior-weights", type=float, nargs="*", default=[0.5, 1.0],
                    help="shape-prior weights to compare at the default step")
    ap.add_argument("--manual", action="store_true", help="also the ground-truth-box upper bound (slow)")
    ap.add_argument("--pipeline-only", action="store_true",
                    help="only the default pipeline arm (no SAM arms: about 7 s per case)")
    ap.add_argument("--runtime", default=RUNTIMES[0], choices=RUNTIMES)
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an interrupted run (OUT.partial.json) and do only the cases it lacks")
    args = ap.parse_args()
    bench = Bench(args, "segbench")
    hn, work = bench.hn, bench.work
    tdirs = bench.templates()

    t0 = time.perf_counter()
    seg = load_segmenter("litemedsam", device="cpu", runtime=args.runtime)
    load_segmenter_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    localizer = LocalizerSpec(cache_dir=str(work / "cache")).build(tdirs)
    prepare_templates_s = time.perf_counter() - t0
    defaults = SegmentOptions()
    cached = CachingSegmenter(seg)
    cohort = CohortSegmenter(localizer, cached, defaults)
    rng = np.random.default_rng(0)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # rows so far, so a long run that dies can be read
    queries = bench.dev_cases()
    rows = json.loads(partial.read_text()) if args.resume and partial.is_file() else []
    rows = [r for r in rows if r["case"] in queries]
    done = {r["case"] for r in rows}
    for n, case in enumerate(queries, 1):
        if case in done:
            continue
        ct_path = hn / f"{case}_ct.nii.gz"
        ct, labels = read_ct(ct_path), read_labels(hn / f"{case}_label.nii.gz")
        sp = labels.geometry.spacing[::-1]
        row = {"case": case, "arms": {}, "timing_s": {}}

        # the product's own path, files included, first (on an empty cache: real timings)
        cached.reset()
        case_dir = work / "out"
        result = cohort.segment_case(ct_path, case_dir)
        record = json.loads((case_dir / f"{result.case}.json").read_text())
        row["timing_s"]["pipeline"] = record["timing_s"]
        row["timing_s"]["pipeline_wall"] = result.seconds
        pipeline_labels = read_labels(case_dir / f"{result.case}_labels.nii.gz").array
        row["arms"]["pipeline"] = scores(labels, pipeline_labels, sp)

        arms = [(f"shape_k{k}", "shape", k, 0.0) for k in sorted(args.steps, reverse=True)]
        arms += [(f"box_k{defaults.slice_step}", "box", defaults.slice_step, 0.0)]
        arms += [(f"prior{w:g}_k{defaults.slice_step}", "shape", defaults.slice_step, w) for w in args.prior_weights]
        arms = [] if args.pipeline_only else arms
        localization = localizer.localize(ct, priors=True) if arms else None  # shared by the other arms
        for arm, prompt, step, weight in arms:
            pred, _, timing = segment_volume(ct, localized_requests(localization, prompt), cached,
                                             replace(defaults, prompt=prompt, slice_step=step, prior_weight=weight))
            row["arms"][arm] = scores(labels, pred, sp)
            row["timing_s"][arm] = timing
        if args.manual:
            manual, _, timing = segment_volume(ct, manual_prompt_requests(labels, rng), cached,
                                               SegmentOptions(margin_px_at_1024=0, slice_step=1))
            row["arms"]["manual"] = scores(labels, manual, sp)
            row["timing_s"]["manual"] = timing
        rows.append(row)
        print(f"[{n}/{len(queries)}] {case}: pipeline {result.seconds:.1f} s, Dice " + ", ".join(
            f"{arm} {mean_dice(s):.3f}" for arm, s in row["arms"].items()), flush=True)
        partial.write_text(json.dumps(rows, indent=1))

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = {"queries": len(rows), "machine": machine(), "segmenter": seg.describe(),
            "default_options": defaults.__dict__, "load_segmenter_s": load_segmenter_s,
            "prepare_templates_s": prepare_templates_s, "peak_rss_mb": peak_rss_mb}
    write_results(out, {"meta": meta, "rows": rows}, markdown(rows, meta))
    # (python -c "from segmentation import *; ..." re-renders the table from the JSON: markdown(rows, meta))
    partial.unlink(missing_ok=True)


def structure_cells(rows, name: str, arms) -> list[str]:
    """"Dice % / HD95 mm" of one structure per arm, over the rows (cases) that hold it."""
    cells = []
    for a in arms:
        vals = [r["arms"][a][name] for r in rows if name in r["arms"][a]]
        cells.append(f"{100 * np.nanmean([v['dice'] for v in vals]):.1f} / {np.nanmean([v['hd95'] for v in vals]):.1f}")
    return cells


def markdown(rows, meta) -> list[str]:
    arms = list(rows[0]["arms"])
    lines = table_head(["structure"] + [f"{a} Dice % / HD95 mm" for a in arms] + ["paper MedLAM + MedSAM Dice %"])
    for _, name in CORE5:
        lines.append(f"| {name} | " + " | ".join(structure_cells(rows, name, arms)) + f" | {PAPER_DSC[name]} |")
    lines.append("| **mean** | " + " | ".join(
        f"**{100 * np.mean([mean_dice(r['arms'][a]) for r in rows]):.1f}**" for a in arms) + " | |")
    p = [r["timing_s"]["pipeline"] for r in rows]
    # Seconds per encoded slice (encode + decode), measured where slices were really encoded: the
    # first arm (in run order) that encoded any, on an empty cache for that case.
    timed = next((a for a in arms if a != "pipeline" and sum(r["timing_s"][a]["slices"] for r in rows) > 0), None)
    if timed:  # not with --pipeline-only, or when no arm encoded a slice
        t = [r["timing_s"][timed] for r in rows]
        per_slice = np.sum([x["encode"] + x["decode"] for x in t]) / max(np.sum([x["slices"] for x in t]), 1)
        lines += ["", f"Slices encoded per case by arm (mean), and the segmentation seconds that implies at "
                  f"{per_slice:.2f} s per encoded slice (encode + decode, measured in the arm {timed}, which "
                  f"ran first on an empty cache):", "",
                  "| arm | slices encoded | slices interpolated (all structures) | implied s |", "|---|---|---|---|"]
        for a in arms:
            if a == "pipeline":
                continue
            t = [r["timing_s"][a] for r in rows]
            n = np.mean([x["slices"] for x in t])
            lines.append(f"| {a} | {n:.1f} | {np.mean([x.get('interpolated_slices', 0) for x in t]):.1f} | {n * per_slice:.1f} |")
    keys = [k for k in ("localize", "encode", "decode", "interpolate", "postprocess", "write", "total") if k in p[0]]
    lines += ["", "The pipeline (`medlsam segment`'s path, default options), seconds per case, mean (max):", "",
              *table_head(keys), "| " + " | ".join(mean_max([x[k] for x in p]) for k in keys) + " |",
              "", f"{meta['queries']} queries; {meta['machine']}; segmenter {meta['segmenter']['name']} on "
              f"{meta['segmenter']['runtime']}. Loading the segmenter {meta['load_segmenter_s']:.1f} s, preparing the "
              f"templates {meta['prepare_templates_s']:.1f} s (once per run). Peak RSS {meta['peak_rss_mb']:.0f} MB."]
    return lines


if __name__ == "__main__":
    main()
