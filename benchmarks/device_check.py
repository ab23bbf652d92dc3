"""The hybrid localizer (and optionally SAM ViT-B) on an accelerator against the CPU, same inputs.

For a session that has a GPU: the same dev scans localized on the CPU and on ``--device``, each
structure's box IoU against its contour on both and the largest face difference between them; the
seconds per query on the device (after a warm-up); a 512 x 512 x 300 scan on the device; and with
``--sam`` a whole ``segment`` case through SAM ViT-B with a randomly initialised model (no SAM
weights are available here: this checks that the path runs and what it costs, not its accuracy).

    python benchmarks/device_check.py --shared ../shared --device cuda --limit 3 --sam --out device_check
"""
from __future__ import annotations

import json
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from MedLSAMLib.evaluate import _mask_box_lps
from MedLSAMLib.geometry import box_iou
from MedLSAMLib.io import read_labels, write_volume
from MedLSAMLib.localizers.hybrid import HybridLocalizer
from MedLSAMLib.pipeline import CohortSegmenter
from MedLSAMLib.segment.backends import load_segmenter
from MedLSAMLib.segment.slices import SegmentOptions

from harness import Bench, arguments, structure_masks, write_results
from scan_size import resized


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare_case(cpu, dev, device: str, ct, labels) -> dict:
    """Both localizers on one scan: per structure the two IoUs and the largest face difference (mm)."""
    on_cpu = cpu.localize(ct, priors=True)
    dev.localize(ct)  # warm-up: first-call costs are not the query's
    _sync(device)
    t0 = time.perf_counter()
    on_dev = dev.localize(ct, priors=True)
    _sync(device)
    row = {"wall_s": time.perf_counter() - t0, "timing_s": on_dev.timing_s, "cpu_timing_s": on_cpu.timing_s,
           "structures": {}}
    for _, name, mask in structure_masks(labels):
        truth = _mask_box_lps(mask, labels.geometry)
        a, b = np.array(on_cpu.structures[name].box_lps), np.array(on_dev.structures[name].box_lps)
        row["structures"][name] = {"iou_cpu": box_iou(a, truth), "iou_device": box_iou(b, truth),
                                   "face_difference_mm": float(np.abs(a - b).max())}
    return row


def sam_case(localizer, device: str, path: Path, work: Path) -> dict:
    """One ``segment`` case through SAM ViT-B, randomly initialised, half SAM and half shape prior."""
    from segment_anything import sam_model_registry
    torch.manual_seed(0)
    checkpoint = work / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
    cohort = CohortSegmenter(localizer, load_segmenter("sam-vit-b", checkpoint=checkpoint, device=device),
                             SegmentOptions(prior_weight=0.5))
    for attempt in ("warm-up", "timed"):  # a fresh output folder each time: a finished case is not redone
        out = work / f"sam_{attempt}"
        _sync(device)
        t0 = time.perf_counter()
        result = cohort.segment_case(path, out)
        _sync(device)
        wall = time.perf_counter() - t0
    record = json.loads((out / f"{result.case}.json").read_text())
    labels = read_labels(out / f"{result.case}_labels.nii.gz").array
    return {"wall_s": wall, "timing_s": record["timing_s"], "labels_present": sorted(int(v) for v in np.unique(labels) if v)}


def main():
    ap = arguments(__doc__, "device_check", limit=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sam", action="store_true", help="also a segment case through a random SAM ViT-B")
    ap.add_argument("--no-large", action="store_true", help="leave out the 512 x 512 x 300 scan")
    args = ap.parse_args()
    bench = Bench(args, "device")
    dirs = bench.templates(folder="labels")
    cpu = HybridLocalizer(dirs, device="cpu", cache_dir=None)
    dev = HybridLocalizer(dirs, device=args.device, cache_dir=None)
    report = {"device": args.device, "torch": torch.__version__, "rows": [],
              "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for case in bench.dev_cases():
        ct, labels = bench.case(case)
        report["rows"].append({"case": case, **compare_case(cpu, dev, args.device, ct, labels)})
        print(case, {k: (round(v["iou_cpu"], 3), round(v["iou_device"], 3), round(v["face_difference_mm"], 1))
                     for k, v in report["rows"][-1]["structures"].items()}, flush=True)
    work = Path(tempfile.mkdtemp(prefix="medlsam-device-"))
    first = bench.dev_cases()[0]
    if not args.no_large:
        path = work / "large.nii.gz"
        write_volume(resized(bench.case(first)[0], (512, 512, 300), linear=True), path)
        dev.localize(path)
        t0 = time.perf_counter()
        timing = dev.localize(path, priors=True).timing_s
        report["large"] = {"wall_s": time.perf_counter() - t0, "timing_s": timing}
    if args.sam:
        try:
            report["sam_random"] = sam_case(dev, args.device, bench.hn / f"{first}_ct.nii.gz", work)
        except Exception:  # the report says what broke; the localizer rows are kept
            report["sam_error"] = traceback.format_exc()
    if args.device.startswith("cuda"):
        report["max_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    write_results(args.out, report, markdown(report))


def markdown(report: dict) -> list[str]:
    rows = report["rows"]
    names = list(rows[0]["structures"]) if rows else []
    iou = {k: np.mean([r["structures"][n][k] for r in rows for n in names]) for k in ("iou_cpu", "iou_device")}
    diff = [r["structures"][n]["face_difference_mm"] for r in rows for n in names]
    lines = [f"device {report['device']} ({report['accelerator']}), torch {report['torch']}; {len(rows)} dev scans", "",
             "| | CPU | device |", "|---|---|---|",
             f"| mean box IoU % | {100 * iou['iou_cpu']:.1f} | {100 * iou['iou_device']:.1f} |",
             "| s per query (mean) | " + f"{np.mean([r['cpu_timing_s']['total_query'] for r in rows]):.2f} | "
             f"{np.mean([r['wall_s'] for r in rows]):.2f} |", "",
             f"largest face difference between the two: {max(diff):.1f} mm; median {np.median(diff):.1f} mm"]
    if "large" in report:
        lines.append(f"512 x 512 x 300 on the device: {report['large']['wall_s']:.2f} s {report['large']['timing_s']}")
    if "sam_random" in report:
        lines.append(f"segment case, random SAM ViT-B: {report['sam_random']}")
    if "sam_error" in report:
        lines.append("SAM case failed: " + report["sam_error"].splitlines()[-1])
    return lines


if __name__ == "__main__":
    main()
