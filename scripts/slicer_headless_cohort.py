"""Segment CTs through the Slicer module's logic on Slicer's own MRML libraries (PyPI slicer-core),
then check the segmentation nodes against what `medlsam segment` writes for the same files.

    .venv/bin/python scripts/slicer_headless_cohort.py --template templates/pt_1 \
        --image ../shared/data/openkbp_hn/validation-pats/pt_201_ct.nii.gz \
                ../shared/data/openkbp_hn/validation-pats/pt_202_ct.nii.gz --out /tmp/headless

Exit status 0 when every mask matches (Dice >= 0.99 per structure), 1 otherwise. Uses the real
LiteMedSAM segmenter; no Qt, no Slicer application.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "MedLSAM"), str(REPO / "MedLSAM" / "Testing" / "Python")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", nargs="+", required=True)
    ap.add_argument("--image", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="wpl", choices=["wpl", "spl"])
    args = ap.parse_args()

    import slicer

    from MedLSAMLib.device import set_cpu_threads
    from MedLSAMLib.io import read_ct
    from MedLSAMLib.localizers import LocalizerSpec
    from MedLSAMLib.settings import RunSettings
    from MedLSAMMRML.logic import MedLSAMCore
    from MedLSAMMRML.nodes import add_volume_node
    from medlsam_scenarios import MIN_DICE_VS_COMMAND_LINE, compare_with_command_line

    set_cpu_threads()
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    images = [Path(p) for p in args.image]
    volumes = [add_volume_node(scene, read_ct(p), p.name.split(".")[0]) for p in images]
    settings = RunSettings(tuple(args.template), LocalizerSpec(mode=args.mode, device="cpu"))
    t0 = time.perf_counter()
    results = MedLSAMCore(scene).process_cohort(volumes, settings,
                                                progress_callback=lambda i, n, s: print(f"[{i}/{n}] {s}", flush=True))
    print(f"Slicer logic: {[r.status for r in results]} in {time.perf_counter() - t0:.0f} s")
    scores, problems = compare_with_command_line(scene, volumes, images, results, settings, Path(args.out))
    for (volume, structure), score in scores.items():
        print(f"{volume:<14} {structure:<14} Dice {score:.4f} vs the command line")
    for problem in problems:
        print(problem)
    ok = (all(r.status == "ok" for r in results) and not problems
          and all(score >= MIN_DICE_VS_COMMAND_LINE for score in scores.values()))
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
