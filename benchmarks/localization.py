"""Localization accuracy on held-out head-and-neck CTs: every localizer arm in one run.

Supports: the first N cases of ``support_candidates_core5``; queries: ``dev_eval_core5``.
Arms (the same templates and queries for all):

* ``medlam``: the shipped MedLAM checkpoint (or ``--checkpoint``);
* ``registration``: SimpleITK affine per template, six points mapped, per-coordinate median;
* ``deformable``: greedy (picsl-greedy) affine + deformable per template, label map warped onto
  the query, per-face median: what a deformable multi-atlas gets with no time budget (the
  ceiling arm; about 20 s per template pair here);
* ``hybrid_global``, ``hybrid_local``: the hybrid localizer's stages in the same run (global
  affine only; with the per-structure local stage), both the per-face median of all templates;
  ``hybrid_closed``: the fused box clipped to the data without open faces extended, and
  ``hybrid``: the shipped default (consensus, second start, fusion, open faces, clipping).

Per structure: 3D box IoU, wall distance (mm) and the signed error of each box face (mm,
positive = the box is larger than the truth on that side). Presence: every query is also cropped
below the brainstem (the brainstem, and with it often the parotids, leave the field of view) and
the hybrid localizer's misses and false boxes are counted. Seconds per query for every arm.

    python benchmarks/localization.py --shared ../shared --out docs/bench/localization
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import SimpleITK as sitk

from MedLSAMLib.geometry import box_from_points, box_iou, wall_distance
from MedLSAMLib.io import Volume, from_sitk, read_ct, read_labels, to_sitk
from MedLSAMLib.localizers.medlam import MedLAMLocalizer
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.localizers.registration import RegistrationLocalizer
from MedLSAMLib.templates import load_template_set

from harness import CORE5, Bench, arguments, machine, table_head, write_results  # benchmarks/ is on sys.path when run as a script

# Paper, StructSeg HaN, 5-shot MedLAM (IoU %): wall distance 2.4-4.0 mm.
PAPER_IOU = {"Brainstem": 70.3, "SpinalCord": 57.7, "RightParotid": 62.7, "LeftParotid": 63.1, "Mandible": 80.9}
FACES = ["x_lo", "y_lo", "z_lo", "x_hi", "y_hi", "z_hi"]


def mask_points(labels: Volume, value: int) -> np.ndarray:
    kji = np.argwhere(labels.array == value)
    return labels.geometry.ijk_to_lps(kji[:, ::-1].astype(float))


def gt_box(labels, value):
    pts = mask_points(labels, value)
    return None if len(pts) == 0 else box_from_points(pts)


def score_box(box, gt) -> dict:
    box = np.asarray(box, dtype=float)
    signed = np.concatenate([gt[0] - box[0], box[1] - gt[1]])  # + = the box is larger on that side
    return {"iou": box_iou(box, gt), "wd_mm": wall_distance(box, gt), "face_mm": signed.round(2).tolist()}


def score(boxes: dict, labels, present: dict | None = None, confidence: dict | None = None) -> dict:
    out = {}
    for value, name in CORE5:
        gt = gt_box(labels, value)
        entry = {"gt_present": gt is not None, "pred_present": (present or {}).get(name, True)}
        if gt is not None:
            entry.update(score_box(boxes[name], gt))
        if confidence and name in confidence:
            entry["confidence"] = confidence[name]
        out[name] = entry
    return out


def score_localization(result, labels) -> dict:
    """``score`` of a localizer's Localization (its boxes, presence and confidence)."""
    s = result.structures
    return score({k: v.box_lps for k, v in s.items()}, labels, {k: v.present for k, v in s.items()},
                 {k: v.confidence for k, v in s.items()})


# --- the deformable ceiling arm ---------------------------------------------------------------------
def _reg_image(vol: Volume) -> sitk.Image:
    im = sitk.Cast(to_sitk(vol), sitk.sitkFloat32)
    return sitk.Clamp(im, sitk.sitkFloat32, -1000.0, 1500.0)


@contextlib.contextmanager
def _quiet_stdout():
    """Greedy prints every iteration from C++ straight to file descriptor 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def deformable_boxes(template_images, template_labels, query: Volume) -> dict:
    """Multi-atlas with deformable registration (picsl-greedy): per template, affine (NCC 4^3, three
    levels) then greedy diffeomorphic (NCC 2^3, 100x50x10 iterations), the template's label map
    warped onto the query (nearest neighbour), one box per structure; per-face median over
    templates. SimpleITK's B-spline took over 4 minutes for the five pairs of one query here;
    greedy takes about 20 s a pair (docs/localizer.md)."""
    from picsl_greedy import Greedy3D  # benchmark-only dependency: pip install picsl-greedy

    fixed = _reg_image(query)
    per_structure = {name: [] for _, name in CORE5}
    for image, labels in zip(template_images, template_labels):
        g = Greedy3D()
        with _quiet_stdout():
            g.execute("-i fixed moving -a -dof 12 -ia-image-centers -n 100x50x0 -m NCC 4x4x4 -o affine",
                      fixed=fixed, moving=_reg_image(image), affine=None)
            g.execute("-i fixed moving -it affine -n 100x50x10 -m NCC 2x2x2 -s 2.0vox 0.5vox -o warp", warp=None)
            g.execute("-rf fixed -ri NN -rm atlas warped -r warp affine",
                      atlas=sitk.Cast(to_sitk(labels), sitk.sitkUInt8), warped=None)
        warped = from_sitk(g["warped"], "warped")
        for value, name in CORE5:
            box = gt_box(warped, value)
            if box is not None:
                per_structure[name].append(box)
    return {name: np.median(np.stack(b), axis=0) for name, b in per_structure.items() if b}


# --- presence on cropped queries ---------------------------------------------------------------------
def crop_below_brainstem(ct: Volume, labels: Volume) -> tuple[Volume, Volume]:
    """The CT without the brainstem's slices and everything above them (OpenKBP: k runs head to foot)."""
    cut = int(np.argwhere(labels.array == 1)[:, 0].max()) + 4
    size = list(ct.geometry.size)
    region = ([size[0], size[1], size[2] - cut], [0, 0, cut])
    return (from_sitk(sitk.RegionOfInterest(to_sitk(ct), *region), ct.name),
            from_sitk(sitk.RegionOfInterest(to_sitk(labels), *region), labels.name))


# --- summary -------------------------------------------------------------------------------------------
def summarize(per_case, arm):
    rows = {}
    for _, name in CORE5:
        vals = [c[arm][name] for c in per_case if arm in c and c[arm][name].get("gt_present")]
        if not vals:
            continue
        iou, wd = [v["iou"] for v in vals], [v["wd_mm"] for v in vals]
        faces = np.array([v["face_mm"] for v in vals])
        rows[name] = {"iou_mean": float(np.mean(iou)), "iou_std": float(np.std(iou)),
                      "wd_mean": float(np.mean(wd)), "wd_std": float(np.std(wd)), "n": len(vals),
                      "face_mean_mm": faces.mean(0).round(2).tolist(), "face_abs_mm": np.abs(faces).mean(0).round(2).tolist()}
    return rows


def main():
    ap = arguments(__doc__, "docs/bench/localization")
    ap.add_argument("--supports", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="MedLAM weights (default: shipped checkpoint)")
    ap.add_argument("--arms", nargs="+", default=["medlam", "registration", "deformable", "hybrid"],
                    choices=["medlam", "registration", "deformable", "hybrid"])
    ap.add_argument("--deformable-limit", type=int, default=0, help="queries for the slow deformable arm (0 = all)")
    args = ap.parse_args()
    bench = Bench(args, "bench")
    hn, splits, work = bench.hn, bench.splits, bench.work
    queries = bench.dev_cases()
    tdirs = bench.templates(args.supports)
    names = [n for _, n in CORE5]
    timing = {}

    def timed(arm, fn):
        t0 = time.perf_counter()
        out = fn()
        timing.setdefault(arm, []).append(time.perf_counter() - t0)
        return out

    setup = {}
    if "medlam" in args.arms:
        t0 = time.perf_counter()
        medlam = MedLAMLocalizer(tdirs, mode="wpl", checkpoint=args.checkpoint, device="cpu")
        setup["medlam"] = time.perf_counter() - t0
    if "hybrid" in args.arms:
        cache = work / "cache"
        t0 = time.perf_counter()
        HybridLocalizer(tdirs, cache_dir=cache)  # prepares the templates and fills the cache
        setup["hybrid_prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hybrid = HybridLocalizer(tdirs, cache_dir=cache)
        setup["hybrid_from_cache"] = time.perf_counter() - t0
    if "registration" in args.arms:
        registration = RegistrationLocalizer(tdirs)  # loads the template CTs once
    templates = [(t, t.load_image()) for t in load_template_set(tdirs)[0]] if "deformable" in args.arms else []
    template_labels = [t.load_labels() for t, _ in templates]

    per_case, presence = [], []
    for n, case in enumerate(queries, 1):
        ct = read_ct(hn / f"{case}_ct.nii.gz")
        labels = read_labels(hn / f"{case}_label.nii.gz")
        row = {"case": case}
        if "medlam" in args.arms:
            row["medlam"] = score_localization(timed("medlam", lambda: medlam.localize(ct)), labels)
        if "registration" in args.arms:
            res = timed("registration", lambda: registration.localize(ct))
            row["registration"] = score({k: v.box_lps for k, v in res.structures.items()}, labels)
        if "deformable" in args.arms and (not args.deformable_limit or n <= args.deformable_limit):
            boxes = timed("deformable", lambda: deformable_boxes([img for _, img in templates], template_labels, ct))
            row["deformable"] = score(boxes, labels)
        if "hybrid" in args.arms:
            res = timed("hybrid", lambda: hybrid.localize(ct, keep_stages=True))
            row["hybrid"] = score_localization(res, labels)
            row["hybrid_timing_s"] = res.timing_s
            # the stages of the same run: global maps only, then + local (median of all templates)
            row["hybrid_global"] = score({k: v["global"] for k, v in res.stages.items()}, labels)
            row["hybrid_local"] = score({k: v["local"] for k, v in res.stages.items()}, labels)
            row["hybrid_closed"] = score({k: v["closed_faces"] for k, v in res.stages.items()}, labels)
            row["hybrid_templates_used"] = res.stages[names[0]]["templates_used"]
            row["hybrid_templates_realigned"] = res.stages[names[0]]["templates_realigned"]
            cropped_ct, cropped_labels = crop_below_brainstem(ct, labels)
            c = hybrid.localize(cropped_ct).structures
            for value, name in CORE5:
                truly = bool((cropped_labels.array == value).any())
                presence.append({"case": case, "structure": name, "in_fov": truly, "reported": c[name].present})
        per_case.append(row)
        print(f"[{n}/{len(queries)}] {case}: " + ", ".join(
            f"{arm} {np.mean([v['iou'] for v in row[arm].values() if 'iou' in v]):.3f}"
            for arm in ("medlam", "registration", "deformable", "hybrid_global", "hybrid_local", "hybrid_closed", "hybrid") if arm in row),
            flush=True)

    arms = [a for a in ("medlam", "registration", "deformable", "hybrid_global", "hybrid_local", "hybrid_closed", "hybrid")
            if any(a in r for r in per_case)]
    summary = {arm: summarize(per_case, arm) for arm in arms}
    meta = {"supports": splits["support_candidates_core5"][: args.supports], "queries": queries,
            "machine": machine(),
            "seconds_per_query": {k: float(np.mean(v)) for k, v in timing.items()},
            "queries_per_arm": {k: len(v) for k, v in timing.items()}, "setup_s": setup}
    if presence:
        meta["presence_on_cropped"] = {
            "structures_in_fov": sum(p["in_fov"] for p in presence),
            "missed": [(p["case"], p["structure"]) for p in presence if p["in_fov"] and not p["reported"]],
            "structures_out_of_fov": sum(not p["in_fov"] for p in presence),
            "false_boxes": [(p["case"], p["structure"]) for p in presence if not p["in_fov"] and p["reported"]]}
    write_results(args.out, {"meta": meta, "summary": summary, "cases": per_case, "presence": presence},
                  markdown(summary, meta, arms))


LABELS = {"medlam": "MedLAM (shipped)", "registration": "affine registration", "deformable": "deformable multi-atlas (greedy)",
          "hybrid_global": "hybrid: global only", "hybrid_local": "hybrid: + local",
          "hybrid_closed": "hybrid: fused, faces closed", "hybrid": "hybrid (default)"}


def markdown(summary, meta, arms) -> str:
    lines = table_head(["structure"] + [f"{LABELS[a]} IoU % / WD mm" for a in arms] + ["paper MedLAM IoU %"])
    for _, name in CORE5:
        cells = []
        for a in arms:
            r = summary[a].get(name)
            cells.append(f"{100 * r['iou_mean']:.1f} / {r['wd_mean']:.1f}" if r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {PAPER_IOU[name]} |")
    means = [f"**{100 * np.mean([summary[a][n]['iou_mean'] for n in summary[a]]):.1f} / "
             f"{np.mean([summary[a][n]['wd_mean'] for n in summary[a]]):.1f}**" for a in arms]
    lines.append("| **mean** | " + " | ".join(means) + f" | {np.mean(list(PAPER_IOU.values())):.1f} |")
    lines.append("| queries | " + " | ".join(str(meta["queries_per_arm"].get(a, meta["queries_per_arm"].get("hybrid", "")))
                                             for a in arms) + " | |")
    lines.append("| s / query | " + " | ".join(
        f"{meta['seconds_per_query'][a]:.1f}" if a in meta["seconds_per_query"] else "(in hybrid)" for a in arms) + " | |")
    lines.append("")
    lines.append("Signed face errors of the default hybrid localizer, mean over queries, mm (+ = box larger on that side):")
    lines.append("")
    lines += table_head(["structure"] + FACES + ["mean abs"])
    final = arms[-1]
    for _, name in CORE5:
        r = summary[final][name]
        lines.append(f"| {name} | " + " | ".join(f"{v:+.1f}" for v in r["face_mean_mm"]) + f" | {np.mean(r['face_abs_mm']):.1f} |")
    if "presence_on_cropped" in meta:
        p = meta["presence_on_cropped"]
        lines.append("")
        lines.append(f"Presence on the cropped queries (hybrid): {len(p['missed'])} missed of {p['structures_in_fov']} "
                     f"structures in the field of view; {len(p['false_boxes'])} false boxes for the "
                     f"{p['structures_out_of_fov']} structures cut out of it.")
    lines.append("")
    lines.append(f"Machine: {meta['machine']}. Template setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in meta["setup_s"].items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
