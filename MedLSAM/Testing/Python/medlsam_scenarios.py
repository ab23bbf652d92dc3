"""Shared test scenarios: the in-Slicer self-test (MedLSAMTest), the repository's real-MRML
pytest suite and ``scripts/slicer_headless_cohort.py`` run exactly these, so inside Slicer only
the Qt glue is new. Test code: it lives under MedLSAM/Testing and is not installed with the
extension (MedLSAMTest finds it in a source checkout).

The data ships with pip (slicerio's chest CT and its Slicer segmentation): nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import Geometry
from MedLSAMLib.io import Volume, from_sitk, read_ct, to_sitk, write_volume
from MedLSAMLib.templates import extreme_points_from_mask

from MedLSAMMRML.logic import RESULT_SUFFIX, VolumeResult
from MedLSAMMRML.nodes import add_volume_node, segment_mask
from MedLSAMMRML.placement import fill_placement_node, new_placement_node, save_template_set

# Structures a box prompt can describe. The ribs (label 1) are left out: one box per slice around
# a cage of thin bones covers the whole thorax, so a box-prompted segmenter returns the thorax
# (measured: 4 % Dice with boxes of 98 % IoU, and its overlap with the lungs cost them half their
# Dice; docs/results.md).
CHEST_STRUCTURES = [(5, "right lung"), (6, "left lung"), (3, "thoracic vertebral column")]


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


MIN_DICE_VS_COMMAND_LINE = 0.99


def build_template_and_cohort(scene, work_dir, cases: int = 2, seed: int = 3, structures=CHEST_STRUCTURES[:2]) -> dict:
    """A template made through the panel's code path (point lists filled from the sample
    segmentation, saved as a template folder) and a cohort of deformed copies loaded as volumes."""
    work_dir = Path(work_dir)
    ct_path, seg_path = sample_data()
    ct = read_ct(ct_path)
    labels = labels_from_segmentation(seg_path, ct)
    template_volume = add_volume_node(scene, ct, "CTChest4 template")
    point_lists = []
    for value, name in structures:
        node = new_placement_node(scene, name, value)
        fill_placement_node(node, extreme_points_from_mask(labels.array == value, labels.geometry))
        point_lists.append(node)
    template_dir = save_template_set(template_volume, point_lists, work_dir / "template")
    rng = np.random.default_rng(seed)
    files, volumes = [], []
    for n in range(cases):
        image, _, _ = deformed_case(ct, labels, rng)
        path = work_dir / "cohort" / f"case{n + 1:02d}.nrrd"
        write_volume(image, path)
        files.append(path)
        volumes.append(add_volume_node(scene, read_ct(path), path.name.split(".")[0]))
    return {"template": template_dir, "volumes": volumes, "files": files, "structures": [n for _, n in structures],
            "work_dir": work_dir}


def check_cohort_results(scene, scenario: dict, results: list[VolumeResult], settings, segmenter=None) -> list[str]:
    """Problems found (empty = pass): every case ok; one segmentation per volume named
    '<volume> MedLSAM' with one segment per structure; present structures non-empty; masks equal
    (Dice >= 0.99) to what the command-line pipeline writes for the same files."""
    problems = [f"{r.volume}: {r.status} {r.error or ''}" for r in results if r.status != "ok"]
    scores, more = compare_with_command_line(scene, scenario["volumes"], scenario["files"], results, settings,
                                             scenario["work_dir"] / "cli", segmenter)
    problems += more
    for (volume, name), score in scores.items():
        if score < MIN_DICE_VS_COMMAND_LINE:
            problems.append(f"{volume}{RESULT_SUFFIX}/{name}: Dice {score:.3f} vs the command line")
    for volume_node in scenario["volumes"]:
        seg = scene.GetFirstNodeByName(volume_node.GetName() + RESULT_SUFFIX)
        if seg is None:
            continue
        segmentation = seg.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        if names != scenario["structures"]:
            problems.append(f"{seg.GetName()}: segments {names}, expected {scenario['structures']}")
    return problems


def compare_with_command_line(scene, volume_nodes, files, results: list[VolumeResult], settings, out_dir: Path,
                              segmenter=None) -> tuple[dict, list[str]]:
    """Run the command-line pipeline on ``files`` (the volumes' files) into ``out_dir`` with its
    own models, built from the same settings (never shared with the code under test), and
    compare each segmentation node with what it wrote. Returns ({(volume, structure): Dice},
    problems)."""
    from MedLSAMLib.evaluate import dice
    from MedLSAMLib.io import read_labels
    from MedLSAMLib.pipeline import run_cohort

    problems, scores = [], {}
    cohort = settings.build(segmenter=segmenter)
    cli = run_cohort(cohort, files, out_dir, show_progress=False)
    if cli.counts["ok"] != len(files):
        problems.append(f"command-line run: {cli.counts}")
    by_volume = {r.volume: r for r in results}
    for volume_node, path in zip(volume_nodes, files):
        seg = scene.GetFirstNodeByName(volume_node.GetName() + RESULT_SUFFIX)
        if seg is None:
            problems.append(f"no segmentation '{volume_node.GetName()}{RESULT_SUFFIX}'")
            continue
        written = read_labels(Path(out_dir) / f"{Path(path).name.split('.')[0]}_labels.nii.gz")
        result = by_volume.get(volume_node.GetName())
        segmentation = seg.GetSegmentation()
        for name, structure in cohort.structures.items():
            if not segmentation.GetSegmentIdBySegmentName(name):
                problems.append(f"{seg.GetName()}: no segment {name!r}")
                continue
            mine = segment_mask(seg, name, written.geometry)
            theirs = written.array == structure.label
            present = result is not None and name in result.structures and result.structures[name].present
            if present and not mine.any():
                problems.append(f"{seg.GetName()}/{name}: present but empty")
            scores[(volume_node.GetName(), name)] = dice(mine, theirs) if (mine.any() or theirs.any()) else 1.0
    return scores, problems
