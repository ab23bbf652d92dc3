"""``medlsam demo``: the whole template -> cohort workflow, offline, on data that ships with pip.

The CT and segmentation come from the ``slicerio`` package (a chest CT made in 3D Slicer).
A template is derived from the segmentation; a small cohort is made of the same CT under known
random affine deformations, crops and noise, so every case has an exact ground truth. The
default (hybrid) localizer finds the template structures in each case, the default segmentation
(the template's mask carried onto the case, see ``SegmentOptions.prior_weight``; LiteMedSAM for
structures without one) makes the masks, and they are scored against the truth.

This shows that the pipeline works end to end. It is not a measure of accuracy on new
patients: the cohort is one patient (the template's own CT, deformed). Held-out accuracy is in
docs/results.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Geometry
from .io import Volume, from_sitk, to_sitk, write_text_atomic, write_volume

# Structures a box prompt can describe. The ribs (label 1) are left out: one box per slice around
# a cage of thin bones covers the whole thorax, so a box-prompted segmenter returns the thorax
# (measured: 4 % Dice with boxes of 98 % IoU, and its overlap with the lungs cost them half their
# Dice; docs/results.md).
DEMO_STRUCTURES = [(5, "right lung"), (6, "left lung"), (3, "thoracic vertebral column")]


def sample_data() -> tuple[Path, Path]:
    try:
        import slicerio
    except ImportError:  # pragma: no cover - slicerio is a dependency
        raise InputError("the demo needs the 'slicerio' package (pip install slicerio)") from None
    base = Path(slicerio.__file__).resolve().parent / "data"
    ct, seg = base / "CTChest4.nrrd", base / "Segmentation.seg.nrrd"
    if not (ct.is_file() and seg.is_file()):
        raise InputError(f"slicerio's sample data is missing from {base}")
    return ct, seg


def labels_from_segmentation(seg_path: Path, reference: Volume) -> Volume:
    """A Slicer .seg.nrrd (one layer, label values per segment) as a label map on ``reference``'s grid."""
    import slicerio

    seg = slicerio.read_segmentation(str(seg_path))
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim != 3:
        raise InputError(f"{seg_path}: expected a single-layer segmentation")
    m = np.asarray(seg["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    geom = Geometry(m[:3, 3], spacing, m[:3, :3] / spacing, voxels.shape)
    labels = Volume(np.ascontiguousarray(voxels.transpose(2, 1, 0)).astype(np.int16), geom, "labels")
    if geom.is_close(reference.geometry):
        return labels
    from .preprocess import resample

    return resample(labels, reference.geometry, linear=False, default=0)


def deformed_case(ct: Volume, labels: Volume, rng: np.random.Generator) -> tuple[Volume, Volume, dict]:
    """The CT and labels under one random affine (+-6 deg, +-6 %, +-20 mm), cropped and noised."""
    angles = np.deg2rad(rng.uniform(-6, 6, 3))
    scales = rng.uniform(0.94, 1.06, 3)
    shift = rng.uniform(-20, 20, 3)
    tx = sitk.AffineTransform(3)
    rot = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    tx.SetMatrix((np.array(rot).reshape(3, 3) @ np.diag(scales)).ravel().tolist())
    tx.SetCenter(tuple(float(v) for v in ct.geometry.ijk_to_lps(np.asarray(ct.geometry.size) / 2)))
    tx.SetTranslation(tuple(float(v) for v in shift))
    # Output grid: the input grid less a few slices at each end (a different field of view).
    crop = rng.integers(1, 4, 2)
    size = list(ct.geometry.size)
    size[2] -= int(crop.sum())
    origin = ct.geometry.ijk_to_lps([0, 0, int(crop[0])])
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetOrigin(tuple(origin))
    ref.SetSpacing(tuple(ct.geometry.spacing))
    ref.SetDirection(tuple(ct.geometry.direction.ravel()))
    img = sitk.Resample(to_sitk(ct), ref, tx, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    lab = sitk.Resample(to_sitk(labels), ref, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    out = from_sitk(img)
    out.array = (out.array + rng.normal(0, 20, out.array.shape)).astype(np.float32)
    info = {"rotation_deg": np.rad2deg(angles).round(2).tolist(), "scale": scales.round(3).tolist(),
            "shift_mm": shift.round(1).tolist(), "cropped_slices": crop.tolist()}
    return out, from_sitk(lab), info


def run_demo(out_dir: Path, cases: int = 3, seed: int = 7, device: str = "auto", log=print,
             localizer_kind: str = "auto") -> dict:
    """Template -> deformed cohort -> ``segment`` -> ``evaluate``; returns the evaluation summary."""
    from .evaluate import evaluate, summarize
    from .io import read_ct
    from .device import set_cpu_threads
    from .localizers import LocalizerSpec
    from .pipeline import run_cohort
    from .settings import RunSettings
    from .templates import template_from_labels

    set_cpu_threads()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    ct_path, seg_path = sample_data()
    ct = read_ct(ct_path)
    labels = labels_from_segmentation(seg_path, ct)
    write_volume(labels, out_dir / "template" / "CTChest4_labels.nii.gz")
    template_from_labels(ct_path, out_dir / "template" / "CTChest4_labels.nii.gz", DEMO_STRUCTURES,
                         out_dir / "template")
    log(f"template: {len(DEMO_STRUCTURES)} structures from {seg_path.name} -> {out_dir / 'template'}")

    rng = np.random.default_rng(seed)
    images, deformations = [], {}
    for n in range(cases):
        img, lab, info = deformed_case(ct, labels, rng)
        name = f"case{n + 1:02d}"
        write_volume(img, out_dir / "cohort" / f"{name}.nii.gz")
        write_volume(lab, out_dir / "cohort_labels" / f"{name}_label.nii.gz")
        images.append(out_dir / "cohort" / f"{name}.nii.gz")
        deformations[name] = info
    log(f"cohort: {cases} deformed, cropped and noised copies -> {out_dir / 'cohort'}")

    settings = RunSettings((str(out_dir / "template"),), LocalizerSpec(localizer_kind, device=device))
    batch = run_cohort(settings.build(), images, out_dir / "results")
    rows = evaluate(out_dir / "results", out_dir / "cohort_labels")
    summary = {"cases": [p.stem.split(".")[0] for p in images], "deformations": deformations,
               "batch": batch.counts, "metrics": summarize(rows), "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(out_dir / "demo_summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    return summary
