"""The typed results and the files: files written before the typed results existed read back
and write out byte for byte, new files keep their layout, and results are never edited in place.

``Testing/Data/formats-0.1.0`` holds files written by MedLSAM 0.1.0 before ``MedLSAMLib.results``
(commit 1df742e: ``medlsam localize`` with each localizer and ``medlsam segment``, two templates
from the shared head-and-neck set, query validation-pats/pt_201). They hold box coordinates and
timings, no image data.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from MedLSAMLib.results import (REVIEW_BELOW, BatchSummary, CaseRecord, Localization, Segmented, StructureResult,
                                StructureSummary, json_text)

from conftest import REPO, hn_case

BEFORE = REPO / "Testing" / "Data" / "formats-0.1.0"
FILES = {"boxes_hybrid.json": Localization, "boxes_hybrid_spl.json": Localization,
         "boxes_medlam.json": Localization, "boxes_registration.json": Localization,
         "pt_201_ct.json": CaseRecord, "summary.json": BatchSummary}


def _layout(value):
    """The keys of a JSON document, nested, in order; lists by their first element."""
    if isinstance(value, dict):
        return [(k, _layout(v)) for k, v in value.items()]
    if isinstance(value, list) and value:
        return [_layout(value[0])]
    return None


@pytest.mark.parametrize("name", sorted(FILES))
def test_files_written_before_the_typed_results_read_back_and_write_out_byte_for_byte(name):
    text = (BEFORE / name).read_text(encoding="utf-8")
    result = FILES[name].from_json(json.loads(text))
    assert json_text(result.to_json()) == text


def test_what_the_old_files_say_is_typed():
    hybrid = Localization.from_json(json.loads((BEFORE / "boxes_hybrid.json").read_text()))
    cord = hybrid.structures["SpinalCord"]
    assert isinstance(cord, StructureResult) and cord.present is True and 0 < cord.confidence <= 1
    assert cord.slice_boxes_ijk and cord.prompt_boxes("shape") == cord.slice_boxes_ijk
    assert cord.prompt_boxes("box") == cord.sub_boxes_ijk and set(cord.evidence) == {
        "match", "agreement", "templates_used", "inside_fraction"}
    medlam = Localization.from_json(json.loads((BEFORE / "boxes_medlam.json").read_text()))
    assert medlam.checkpoint["sha256"] and medlam.structures["Brainstem"].slice_boxes_ijk is None
    assert medlam.structures["Brainstem"].prompt_boxes("shape") == medlam.structures["Brainstem"].sub_boxes_ijk
    record = CaseRecord.from_json(json.loads((BEFORE / "pt_201_ct.json").read_text()))
    summary = BatchSummary.from_json(json.loads((BEFORE / "summary.json").read_text()))
    assert record.status == "ok" and summary.counts == {"ok": 1, "failed": 0, "resumed": 0}
    # the summary says of each structure what the case record says
    assert summary.cases[0].structures == record.summaries()
    assert all(s.segmented.voxels > 0 for s in record.structures.values())


def _entry(**changes) -> StructureResult:
    box = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    base = dict(label=1, present=True, confidence=0.8, box_lps=box, box_ijk=[[0, 0, 0], [1, 1, 1]],
                sub_boxes_lps=[box], sub_boxes_ijk=[[[0, 0, 0], [1, 1, 1]]], extreme_points_lps=[[0.0] * 3] * 6)
    return StructureResult(**{**base, **changes})


def test_one_review_rule():
    assert not _entry().needs_review()
    assert _entry(present=False).needs_review()
    assert _entry(confidence=REVIEW_BELOW - 0.01).needs_review() and not _entry(confidence=REVIEW_BELOW).needs_review()
    assert _entry().with_segmentation(Segmented(0)).needs_review(), "an empty mask is reviewed"
    assert not _entry().with_segmentation(Segmented(10, 3, 12)).needs_review()
    assert StructureSummary(True, 0.9, None).needs_review() is False  # localized only: no mask to judge


def test_the_summary_carries_the_review_flag_and_the_share_shown():
    """summary.json says which structures to review, and how much of a partly shown one the scan holds."""
    import sys

    sys.path.insert(0, str(REPO / "MedLSAM"))
    from MedLSAMMRML.logic import VolumeResult

    partial = _entry(evidence={"visible_fraction": 0.4}).with_segmentation(Segmented(10)).summary()
    assert partial.to_json() == {"present": True, "confidence": partial.confidence, "voxels": 10, "review": False,
                                 "visible_fraction": 0.4}
    assert StructureSummary.from_json(partial.to_json()) == partial
    flagged = _entry(confidence=0.1, evidence={"visible_fraction": 0.3}).with_segmentation(Segmented(5)).summary()
    assert flagged.to_json()["review"] is True
    row = VolumeResult("pt_1", "ok", structures={"Cord": flagged, "Jaw": partial})
    assert row.review_text == "Cord (30 % in scan)"


def test_segmentation_makes_a_new_result_and_leaves_the_localizers_alone():
    found = _entry(evidence={"match": 0.5})
    segmented = found.with_segmentation(Segmented(10, 3, 12))
    assert found.segmented is None and "voxels" not in found.to_json()
    doc = segmented.to_json()
    assert list(doc)[-4:] == ["match", "slices", "voxels_before_overlap", "voxels"]
    assert StructureResult.from_json(doc) == segmented


#: Evidence the hybrid localizer added since the old files were written (the seventh session).
ADDED_EVIDENCE = ("global_match", "visible_fraction", "extent_mm", "visible_agreement", "height_mm")  # ninth: extent_mm; tenth: the last two


def _without_settings(doc: dict) -> dict:
    """A boxes.json without the localizer's settings (that dict grows with every new option) and
    without the evidence added since the old files."""
    doc = dict(doc, localizer=dict(doc["localizer"]))
    doc["localizer"].pop("settings")
    doc["structures"] = {n: {k: v for k, v in s.items() if k not in ADDED_EVIDENCE} for n, s in doc["structures"].items()}
    return doc


TOLERANCE_MM = 2.0


def test_a_new_hybrid_boxes_json_and_case_record_have_the_old_layout(tmp_path):
    """The default localizer and the pipeline, today, on the query the old files were made from."""
    from MedLSAMLib.localizers import LocalizerSpec
    from MedLSAMLib.localizers.fusion import FusionSettings
    from MedLSAMLib.localizers.hybrid import HybridLocalizer
    from MedLSAMLib.localizers.prepared import HybridSettings
    from MedLSAMLib.pipeline import CohortSegmenter
    from MedLSAMLib.templates import template_from_labels

    from segmenters import ThresholdSegmenter

    structures = [(1, "Brainstem"), (2, "SpinalCord"), (7, "Mandible")]
    templates = []
    for case in ("train-pats/pt_1", "train-pats/pt_100"):
        ct, labels = hn_case(case)
        templates.append(template_from_labels(ct, labels, structures, tmp_path / Path(case).name).directory)
    localizer = LocalizerSpec("hybrid", device="cpu", cache_dir=None).build(templates)
    query = hn_case("validation-pats/pt_201")[0]
    boxes = json.loads(json_text(localizer.localize(query).to_json()))  # as written
    old_boxes = json.loads((BEFORE / "boxes_hybrid.json").read_text())
    assert _layout(_without_settings(boxes)) == _layout(_without_settings(old_boxes))
    # settings are only ever added (the fifth session added part_length_mm)
    assert set(old_boxes["localizer"]["settings"]) <= set(boxes["localizer"]["settings"])
    # With the options the old default had, the old file's boxes are found again, to within what
    # the seventh session's cheaper working images (resampled before smoothing) and exact data
    # box move them: the typed results and everything since changed nothing else on that path.
    before = HybridLocalizer(templates, cache_dir=None,
                             settings=HybridSettings(part_length_mm=0.0, search_beyond_fov=False,
                                                     global_static_outside=False),
                             fusion=FusionSettings(visible_boxes=False, presence="box")).localize(query)
    for name, s in old_boxes["structures"].items():
        assert np.abs(np.array(before.structures[name].box_lps) - s["box_lps"]).max() <= TOLERANCE_MM, name

    result = CohortSegmenter(localizer, ThresholdSegmenter()).segment_case(query, tmp_path / "out")
    new = json.loads((tmp_path / "out" / f"{result.case}.json").read_text())
    old = json.loads((BEFORE / "pt_201_ct.json").read_text())
    for key in ("timing_s", "models"):  # another segmenter, other stages timed
        new.pop(key), old.pop(key)
    new["structures"] = {n: {k: v for k, v in s.items() if k not in ADDED_EVIDENCE} for n, s in new["structures"].items()}
    assert _layout(new) == _layout(old)
