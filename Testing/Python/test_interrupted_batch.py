"""A `medlsam segment` batch killed with SIGKILL (in the middle of a case, and in the middle of
writing a case's outputs) and rerun with --resume loses nothing: cases finished before the kill
are kept byte for byte, the interrupted one is redone, no temporary is left, and summary.json
lists every case once, as an uninterrupted run does. Two batches on one --out: the second is
refused (a lock on the folder).

The kills are real SIGKILLs of real `medlsam segment` processes on real CTs; only *when* each
process kills itself is set by a small launcher (below), so that the moment is exact rather
than a race with a timer.
"""
import json
import os
import subprocess
import sys

import pytest

from MedLSAMLib.io import read_labels
from MedLSAMLib.pipeline import output_lock
from MedLSAMLib.templates import template_from_labels

from conftest import CORE5, hn_case

CASES = ["validation-pats/pt_201", "validation-pats/pt_202"]

# Runs `medlsam segment` and SIGKILLs itself at the moment named by MEDLSAM_TEST_KILL:
#   "case:N"  - the N-th case of this process, after its localization, before any of its outputs
#   "write:N" - the N-th .seg.nrrd of this process: its temporary fully written, not yet renamed
LAUNCHER = r'''
import os, signal, sys
import slicerio
import MedLSAMLib.pipeline as pipeline
from MedLSAMLib.cli import main

where, n = os.environ["MEDLSAM_TEST_KILL"].split(":")
calls = {"n": 0}

def kill_on_nth(real):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs) if where == "write" else None  # "write": the temporary is complete
        if calls["n"] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return result if where == "write" else real(*args, **kwargs)
    return wrapped

if where == "case":
    pipeline.segment_volume = kill_on_nth(pipeline.segment_volume)
else:
    slicerio.write_segmentation = kill_on_nth(slicerio.write_segmentation)
raise SystemExit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def batch(tmp_path_factory, hn_dir):
    work = tmp_path_factory.mktemp("interrupted")
    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, CORE5, work / "tpl")
    launcher = work / "launch.py"
    launcher.write_text(LAUNCHER)
    images = [str(hn_case(c)[0]) for c in CASES]

    def segment(out, kill=None, resume=False):
        cmd = [sys.executable, str(launcher) if kill else "-m", *([] if kill else ["MedLSAMLib"]), "segment",
               "--template", str(work / "tpl"), "--image", *images, "--out", str(out), "--device", "cpu",
               *(["--resume"] if resume else [])]
        env = {**os.environ, **({"MEDLSAM_TEST_KILL": kill} if kill else {})}
        return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600)

    reference = segment(work / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    return segment, work


def _without_timings(summary: dict) -> dict:
    cases = [{k: v for k, v in c.items() if k not in ("seconds", "resumed")} for c in summary["cases"]]
    counts = {k: v for k, v in summary["counts"].items() if k != "resumed"}
    return {**summary, "cases": cases, "counts": counts}


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_killed_mid_case_then_mid_write_and_resumed_loses_nothing(batch):
    segment, work = batch
    out = work / "out"
    first = ("pt_201_ct.json", "pt_201_ct.seg.nrrd", "pt_201_ct_labels.nii.gz")

    # 1. killed in the middle of the second case: the first is complete, nothing of the second exists
    killed = segment(out, kill="case:2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(first)
    kept = _files(out)

    # 2. resumed, and killed again while writing the second case's segmentation (its label map is
    #    already written): a temporary is left behind, no .json for the case, no summary
    killed = segment(out, kill="write:1", resume=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith(".pt_202_ct.seg.nrrd.") and ".tmp" in n], names
    assert "pt_202_ct.json" not in names and "summary.json" not in names

    # 3. resumed to the end
    done = segment(out, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 segmented, 1 finished earlier" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*first, "pt_202_ct.json", "pt_202_ct.seg.nrrd", "pt_202_ct_labels.nii.gz", "summary.json"]), \
        "no temporary or partial file is left"
    now = _files(out)
    assert all(now[name] == kept[name] for name in first), "the case finished before the kills is kept byte for byte"

    reference = json.loads((work / "reference" / "summary.json").read_text())
    resumed = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in resumed["cases"]] == ["pt_201_ct", "pt_202_ct"]
    assert [c["resumed"] for c in resumed["cases"]] == [True, False]
    assert resumed["counts"] == {"ok": 2, "failed": 0, "resumed": 1}
    ref = _without_timings(reference)
    assert _without_timings(resumed) == ref
    for case in ("pt_201_ct", "pt_202_ct"):  # the redone case equals the uninterrupted run's
        a = read_labels(out / f"{case}_labels.nii.gz")
        b = read_labels(work / "reference" / f"{case}_labels.nii.gz")
        assert (a.array == b.array).all() and a.array.any()


def test_a_second_batch_on_the_same_out_is_refused(batch, tmp_path):
    segment, _ = batch
    out = tmp_path / "busy"
    out.mkdir()
    with output_lock(out):  # as a running batch holds it
        second = segment(out)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"medlsam: error: {out}: another medlsam batch is writing into this folder; wait for it to finish or "
        "choose another --out"]
    assert not list(out.iterdir()), "the refused batch wrote nothing"
    with output_lock(out):  # released with its holder: the next batch may go
        pass
