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
sys.path.insert(0, str(REPO / "MedLSAM"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", nargs="+", required=True)
    ap.add_argument("--image", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="wpl", choices=["wpl", "spl"])
    args = ap.parse_args()

    import slicer

    from MedLSAMLib.evaluate import dice
    from MedLSAMLib.io import read_ct, read_labels
    from MedLSAMLib.device import set_cpu_threads
    from MedLSAMLib.localizers import LocalizerSpec
    from MedLSAMLib.pipeline import run_cohort
    from MedLSAMLib.settings import RunSettings
    from MedLSAMMRML.logic import MedLSAMCore
    from MedLSAMMRML.nodes import add_volume_node, segment_mask

    set_cpu_threads()
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    images = [Path(p) for p in args.image]
    volumes = [add_volume_node(scene, read_ct(p), p.name.split(".")[0]) for p in images]
    core = MedLSAMCore(scene)
    settings = RunSettings(tuple(args.template), LocalizerSpec(mode=args.mode, device="cpu"))
    t0 = time.perf_counter()
    results = core.process_cohort(volumes, settings,
                                  progress_callback=lambda i, n, s: print(f"[{i}/{n}] {s}", flush=True))
    print(f"Slicer logic: {[r['status'] for r in results]} in {time.perf_counter() - t0:.0f} s")
    localizer = core.localizer(settings)
    cli = run_cohort(settings.build(), images, Path(args.out), show_progress=False)
    print(f"command-line pipeline: {cli['counts']}")
    ok = all(r["status"] == "ok" for r in results) and cli["counts"]["ok"] == len(images)
    for node, path in zip(volumes, images):
        seg = scene.GetFirstNodeByName(node.GetName() + " MedLSAM")
        written = read_labels(Path(args.out) / f"{path.name.split('.')[0]}_labels.nii.gz")
        for s in localizer.templates[0].structures.values():
            mine, theirs = segment_mask(seg, s.name, written.geometry), written.array == s.label
            score = dice(mine, theirs) if (mine.any() or theirs.any()) else 1.0
            ok &= score >= 0.99
            print(f"{node.GetName():<14} {s.name:<14} voxels {int(mine.sum()):>6} vs {int(theirs.sum()):>6}  Dice {score:.4f}")
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
