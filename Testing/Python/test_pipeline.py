"""Cohort pipeline on real CTs: outputs, slicerio read-back, atomic writes, resume, a corrupt case."""
import json

import numpy as np
import pytest
import slicerio

from MedLSAMLib.io import read_labels
from MedLSAMLib.localizers.medlam import MedLAMLocalizer
from MedLSAMLib.pipeline import CohortSegmenter, is_complete, list_cohort, run_cohort
from MedLSAMLib.errors import InputError

from conftest import hn_case, hn_template
from segmenters import ThresholdSegmenter


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tpl = hn_template("train-pats/pt_1", [(7, "Mandible"), (2, "SpinalCord")], tmp_path_factory.mktemp("tpl"))
    localizer = MedLAMLocalizer([tpl], mode="wpl", device="cpu")
    return CohortSegmenter(localizer, ThresholdSegmenter())


def test_batch_with_a_corrupt_file_finishes_the_others_then_resumes(cohort, tmp_path):
    good = [hn_case("validation-pats/pt_201")[0], hn_case("validation-pats/pt_202")[0]]
    bad = tmp_path / "broken_ct.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    summary = run_cohort(cohort, [good[0], bad, good[1]], out, show_progress=False)
    assert summary.counts == {"ok": 2, "failed": 1, "resumed": 0}
    failed = [c for c in summary.cases if c.status == "failed"][0]
    assert failed.case == "broken_ct" and "damaged or ends early" in failed.error
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

    # resume: finished cases are kept untouched and reported as recorded; the broken one is tried again
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cohort(cohort, [good[0], bad, good[1]], out, resume=True, show_progress=False)
    assert again.counts == {"ok": 2, "failed": 1, "resumed": 2}
    assert [c.structures for c in again.cases] == [c.structures for c in summary.cases]
    assert all(before[p.name] == p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.json")


def test_incomplete_case_is_redone_on_resume(cohort, tmp_path):
    ct = hn_case("validation-pats/pt_201")[0]
    out = tmp_path / "out"
    run_cohort(cohort, [ct], out, show_progress=False)
    (out / "pt_201_ct.seg.nrrd").unlink()  # as if the run died between two writes
    assert not is_complete(out, "pt_201_ct")
    summary = run_cohort(cohort, [ct], out, resume=True, show_progress=False)
    assert summary.counts["ok"] == 1 and is_complete(out, "pt_201_ct")


def test_cohort_listing(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "a.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="share the case name"):
        list_cohort(images_dir=tmp_path)
    with pytest.raises(InputError, match="no input images"):
        list_cohort()


def test_a_truncated_ct_is_refused_in_read_localize_and_a_batch(cohort, tmp_path):
    """An interrupted copy (the first third of a real .nii.gz, and of the same CT uncompressed):
    a one-line error naming the file, never a scan whose missing part reads as zeros."""
    import subprocess
    import sys

    import SimpleITK as sitk

    from MedLSAMLib.io import read_ct

    source = hn_case("validation-pats/pt_201")[0]
    gz = tmp_path / "cut_ct.nii.gz"
    gz.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    raw = tmp_path / "cut_raw_ct.nii"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(tmp_path / "whole.nii"))
    raw.write_bytes((tmp_path / "whole.nii").read_bytes()[:1_500_000])
    with pytest.raises(InputError, match="damaged or ends early"):
        read_ct(gz)
    with pytest.raises(InputError, match="data ends early"):
        read_ct(raw)
    assert read_ct(tmp_path / "whole.nii").array.shape == (128, 128, 128)

    tpl = cohort.localizer.templates[0].directory
    proc = subprocess.run([sys.executable, "-m", "MedLSAMLib", "localize", "--template", str(tpl), "--image", str(gz),
                           "--out", str(tmp_path / "boxes.json")], capture_output=True, encoding="utf-8", errors="replace")
    assert proc.returncode == 2 and "cut_ct.nii.gz" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "boxes.json").exists()

    out = tmp_path / "out"
    summary = run_cohort(cohort, [gz, hn_case("validation-pats/pt_202")[0]], out, show_progress=False)
    assert summary.counts == {"ok": 1, "failed": 1, "resumed": 0}
    assert "ends early" in summary.cases[0].error and not (out / "cut_ct_labels.nii.gz").exists()


def test_out_naming_a_file_and_an_empty_images_dir_get_one_line_errors(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(InputError, match="no CT files in this folder"):
        list_cohort(images_dir=tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-m", "MedLSAMLib", "segment", "--template", str(tmp_path), "--image",
                           str(hn_case("validation-pats/pt_201")[0]), "--out", str(tmp_path / "a_file")],
                          capture_output=True, encoding="utf-8", errors="replace")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--out must be a folder, and this is a file")


def test_a_dicom_series_missing_a_slice_is_refused_in_localize_and_fails_only_its_case(cohort, tmp_path):
    """A real CT exported as a DICOM series, one slice removed from the middle."""
    import subprocess
    import sys

    import SimpleITK as sitk

    from test_io import write_dicom_series

    image = sitk.Cast(sitk.ReadImage(str(hn_case("validation-pats/pt_201")[0])), sitk.sitkInt16)
    series = write_dicom_series(image, tmp_path / "pt_201_dicom", skip={64})
    tpl = cohort.localizer.templates[0].directory
    proc = subprocess.run([sys.executable, "-m", "MedLSAMLib", "localize", "--template", str(tpl), "--image",
                           str(series), "--out", str(tmp_path / "boxes.json")], capture_output=True, encoding="utf-8", errors="replace")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "missing slice" in proc.stderr
    assert str(series) in proc.stderr and not (tmp_path / "boxes.json").exists()

    out = tmp_path / "out"
    summary = run_cohort(cohort, [series, hn_case("validation-pats/pt_202")[0]], out, show_progress=False)
    assert [c.status for c in summary.cases] == ["failed", "ok"]
    assert "missing slice" in summary.cases[0].error
    assert sorted(p.name for p in out.iterdir()) == ["pt_202_ct.json", "pt_202_ct.seg.nrrd", "pt_202_ct_labels.nii.gz",
                                                     "summary.json"]
