"""Cohort pipeline on real CTs: outputs, slicerio read-back, atomic writes, resume, a corrupt case."""
import json

import numpy as np
import pytest
import slicerio

from MedLSAMLib.io import read_labels
from MedLSAMLib.localize import TemplateLocalizer
from MedLSAMLib.pipeline import CohortSegmenter, is_complete, list_cohort, run_cohort
from MedLSAMLib.templates import template_from_labels
from MedLSAMLib.errors import InputError

from conftest import hn_case
from test_segmentation import ThresholdSegmenter


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    ct, labels = hn_case("train-pats/pt_1")
    tpl = tmp_path_factory.mktemp("tpl")
    template_from_labels(ct, labels, [(7, "Mandible"), (2, "SpinalCord")], tpl)
    localizer = TemplateLocalizer([tpl], mode="wpl", device="cpu")
    return CohortSegmenter(localizer, ThresholdSegmenter())


def test_batch_with_a_corrupt_file_finishes_the_others_then_resumes(cohort, tmp_path):
    good = [hn_case("validation-pats/pt_201")[0], hn_case("validation-pats/pt_202")[0]]
    bad = tmp_path / "broken_ct.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    summary = run_cohort(cohort, [good[0], bad, good[1]], out, show_progress=False)
    assert summary["counts"] == {"ok": 2, "skipped": 0, "failed": 1}
    failed = [c for c in summary["cases"] if c["status"] == "failed"][0]
    assert failed["case"] == "broken_ct" and "cannot read" in failed["error"]
    assert json.loads((out / "summary.json").read_text())["counts"]["failed"] == 1
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no temporary files left"

    for path in good:
        case = path.name[: -len(".nii.gz")]
        assert is_complete(out, case)
        rec = json.loads((out / f"{case}.json").read_text())
        labels = read_labels(out / f"{case}_labels.nii.gz")
        seg = slicerio.read_segmentation(str(out / f"{case}.seg.nrrd"))
        assert [s["name"] for s in seg["segments"]] == ["Mandible", "SpinalCord"]
        assert np.allclose(seg["ijkToLPS"], labels.geometry.ijk_to_lps_matrix, atol=1e-4)
        for s in seg["segments"]:
            mask = slicerio.segment_mask(seg, s).transpose(2, 1, 0)  # slicerio voxels are [i, j, k]
            assert np.array_equal(mask, labels.array == s["labelValue"])
            assert (labels.array == s["labelValue"]).sum() == rec["structures"][s["name"]]["voxels"]
        assert {"localize", "encode", "decode", "total"} <= set(rec["timing_s"])

    # resume: finished cases are skipped and untouched; the broken one is tried again
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cohort(cohort, [good[0], bad, good[1]], out, resume=True, show_progress=False)
    assert again["counts"] == {"ok": 0, "skipped": 2, "failed": 1}
    assert all(before[p.name] == p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.json")


def test_incomplete_case_is_redone_on_resume(cohort, tmp_path):
    ct = hn_case("validation-pats/pt_201")[0]
    out = tmp_path / "out"
    run_cohort(cohort, [ct], out, show_progress=False)
    (out / "pt_201_ct.seg.nrrd").unlink()  # as if the run died between two writes
    assert not is_complete(out, "pt_201_ct")
    summary = run_cohort(cohort, [ct], out, resume=True, show_progress=False)
    assert summary["counts"]["ok"] == 1 and is_complete(out, "pt_201_ct")


def test_cohort_listing(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "a.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="share the case name"):
        list_cohort(images_dir=tmp_path)
    with pytest.raises(InputError, match="no input images"):
        list_cohort()
