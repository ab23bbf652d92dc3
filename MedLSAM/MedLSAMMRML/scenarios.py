"""Shared test scenarios: the in-Slicer self-test (MedLSAMTest) and the repository's real-MRML
pytest suite run exactly these, so inside Slicer only the Qt glue is new.

The data ships with pip (slicerio's chest CT and its Slicer segmentation): nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from MedLSAMLib.demo import DEMO_STRUCTURES, deformed_case, labels_from_segmentation, sample_data
from MedLSAMLib.io import read_ct, write_volume
from MedLSAMLib.templates import extreme_points_from_mask

from .logic import RESULT_SUFFIX
from .nodes import add_volume_node, segment_mask
from .placement import fill_placement_node, new_placement_node, save_template_set

MIN_DICE_VS_COMMAND_LINE = 0.99


def build_template_and_cohort(scene, work_dir, cases: int = 2, seed: int = 3, structures=DEMO_STRUCTURES[:2]) -> dict:
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


def check_cohort_results(scene, scenario: dict, results: list[dict], settings, segmenter=None) -> list[str]:
    """Problems found (empty = pass): every case ok; one segmentation per volume named
    '<volume> MedLSAM' with one segment per structure; present structures non-empty; masks equal
    (Dice >= 0.99) to what the command-line pipeline writes for the same files."""
    from MedLSAMLib.evaluate import dice
    from MedLSAMLib.io import read_labels
    from MedLSAMLib.pipeline import run_cohort

    problems = []
    for r in results:
        if r["status"] != "ok":
            problems.append(f"{r['volume']}: {r['status']} {r.get('error', '')}")
    # its own models, built from the same settings the way the command line builds them (never
    # shared with the code under test)
    cohort = settings.build(segmenter=segmenter)
    cli = run_cohort(cohort, scenario["files"], scenario["work_dir"] / "cli", show_progress=False)
    if cli["counts"]["ok"] != len(scenario["files"]):
        problems.append(f"command-line run: {cli['counts']}")
    for volume_node, path in zip(scenario["volumes"], scenario["files"]):
        seg = scene.GetFirstNodeByName(volume_node.GetName() + RESULT_SUFFIX)
        if seg is None:
            problems.append(f"no segmentation '{volume_node.GetName()}{RESULT_SUFFIX}'")
            continue
        segmentation = seg.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        if names != scenario["structures"]:
            problems.append(f"{seg.GetName()}: segments {names}, expected {scenario['structures']}")
            continue
        written = read_labels(scenario["work_dir"] / "cli" / f"{path.name.split('.')[0]}_labels.nii.gz")
        result = next(r for r in results if r["volume"] == volume_node.GetName())
        for name in scenario["structures"]:
            label = cohort.structures[name].label
            mine = segment_mask(seg, name, written.geometry)
            theirs = written.array == label
            present = result.get("structures", {}).get(name, {}).get("present", False)
            if present and not mine.any():
                problems.append(f"{seg.GetName()}/{name}: present but empty")
            if (mine.any() or theirs.any()) and dice(mine, theirs) < MIN_DICE_VS_COMMAND_LINE:
                problems.append(f"{seg.GetName()}/{name}: Dice {dice(mine, theirs):.3f} vs the command line")
    return problems
