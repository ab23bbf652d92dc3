"""The Slicer module's long work in a worker process (MedLSAMMRML.process, MedLSAMLib.worker), on
Slicer's real MRML libraries (slicer-core): the panel's cohort run gives the command line's masks,
Cancel stops the worker at once, a worker that dies fails its cases with the reason, and the
effect's localize and segment-range jobs give what the same code gives in-process."""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from MedLSAMLib.localizers import LocalizerSpec
from MedLSAMLib.results import Localization
from MedLSAMLib.settings import RunSettings, SegmenterSpec

from conftest import hn_case, hn_template

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")

from MedLSAMMRML import effect, nodes, process  # noqa: E402
from MedLSAMMRML.logic import MedLSAMCore  # noqa: E402


def drive(run, on_poll=None, limit_s=600):
    """What the panel's QTimer does: poll, then let the event loop run (here: sleep)."""
    polls, t0 = 0, time.perf_counter()
    while run.poll():
        polls += 1
        if on_poll:
            on_poll(run)
        threading.Event().wait(0.05)
        assert time.perf_counter() - t0 < limit_s, "the worker did not finish"
    return polls


def _cohort_run(scene, tmp_path, cases: int) -> "process.CohortProcessRun":
    """A template and ``cases`` cohort volumes in the scene, their run started in a worker."""
    from medlsam_scenarios import build_template_and_cohort

    scenario = build_template_and_cohort(scene, tmp_path, cases=cases)
    settings = RunSettings((scenario["template"],), LocalizerSpec(device="cpu"))
    return process.CohortProcessRun(MedLSAMCore(scene), scenario["volumes"], settings, work_dir=tmp_path / "run")


def test_the_panels_cohort_run_in_a_worker_gives_the_command_lines_masks(scene, tmp_path):
    from medlsam_scenarios import build_template_and_cohort, check_cohort_results

    scenario = build_template_and_cohort(scene, tmp_path, cases=2)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    settings = RunSettings((scenario["template"],), LocalizerSpec(device="cpu"))
    stages = []
    run = process.CohortProcessRun(MedLSAMCore(scene), [scenario["volumes"][0], empty, scenario["volumes"][1]],
                                   settings, progress_callback=lambda i, n, stage: stages.append(stage))
    polls = drive(run)
    assert polls > 10, "poll() returns at once while the worker computes"
    assert [r.status for r in run.results] == ["ok", "failed", "ok"]
    assert "no image data" in run.results[1].error
    assert stages[-1] == "done" and any(s.startswith("segmenting case") for s in stages)
    ok = [r for r in run.results if r.status == "ok"]
    assert check_cohort_results(scene, scenario, ok, settings) == []  # Dice >= 0.99 with the command line
    assert not run.work_dir.exists(), "the run's temporary files are removed"


def test_cancel_stops_the_worker_at_once_and_keeps_finished_cases(scene, tmp_path):
    run = _cohort_run(scene, tmp_path, cases=3)
    cancelled_at = []

    def cancel_after_first(r):
        if r.results and not cancelled_at:
            r.cancel()
            cancelled_at.append(time.perf_counter())

    drive(run, cancel_after_first)
    assert time.perf_counter() - cancelled_at[0] < 5.0, "the worker was stopped, not waited for"
    assert [r.status for r in run.results] == ["ok", "cancelled", "cancelled"]
    assert run.job.process.returncode == -signal.SIGKILL
    assert scene.GetFirstNodeByName("case02 MedLSAM") is None and scene.GetFirstNodeByName("case01 MedLSAM")


def test_a_worker_that_dies_fails_its_cases_with_the_reason(scene, tmp_path):
    run = _cohort_run(scene, tmp_path, cases=2)
    os.kill(run.job.process.pid, signal.SIGKILL)  # a crash (out of memory, a segfault in a library)
    drive(run)
    assert [r.status for r in run.results] == ["failed", "failed"]
    assert run.results[0].error == "the MedLSAM worker process was killed by signal 9"


def test_a_wrong_template_is_reported_by_the_worker_in_one_line(scene, tmp_path):
    volume = nodes.add_volume_node(scene, __import__("MedLSAMLib.io", fromlist=["read_ct"]).read_ct(
        hn_case("validation-pats/pt_201")[0]), "pt_201")
    (tmp_path / "empty").mkdir()
    settings = RunSettings((tmp_path / "empty",), LocalizerSpec(device="cpu"))
    run = process.CohortProcessRun(MedLSAMCore(scene), [volume], settings, work_dir=tmp_path / "run")
    drive(run)
    assert run.results[0].status == "failed"
    assert "template.json" in run.results[0].error and "\n" not in run.results[0].error


def test_the_effects_localize_and_segment_range_jobs_match_the_in_process_code(scene, tmp_path):
    from MedLSAMLib.io import read_ct

    hn_template("train-pats/pt_1", [(7, "Mandible")], tmp_path / "tpl")
    volume_node = nodes.add_volume_node(scene, read_ct(hn_case("validation-pats/pt_201")[0]), "pt_201")
    settings = RunSettings((tmp_path / "tpl",), LocalizerSpec(device="cpu"))
    work = tmp_path / "localize"
    image = process.volume_file(volume_node, work, "volume")
    job = process.ProcessJob({"kind": "localize", "settings": settings.to_json(), "image": str(image),
                              "out": str(work / "boxes.json")}, work)
    while not job.done():
        job.wait(0.1)
    state, path = job.outcome()
    assert state == "done"
    in_worker = Localization.from_json(json.loads(path.read_text()))
    in_process = MedLSAMCore(scene).localize(settings, volume_node)
    assert in_worker.structures["Mandible"].box_ijk == in_process.structures["Mandible"].box_ijk

    box = in_process.structures["Mandible"].box_ijk
    axial = effect.axial_axis(volume_node)
    middle = (box[0][axial] + box[1][axial]) // 2
    volume, request, lo, hi = effect.prepare_box(volume_node, box, slices=(middle, middle + 1))
    work = tmp_path / "box"
    work.mkdir()
    from MedLSAMLib.io import write_volume

    write_volume(volume, work / "volume.nrrd", compress=False)
    job = process.ProcessJob({"kind": "box", "segmenter": {"name": "litemedsam", "checkpoint": None, "runtime": "auto"},
                              "device": "cpu", "image": str(work / "volume.nrrd"),
                              "request": effect.request_json(request), "out": str(work / "labels.npy")}, work)
    while not job.done():
        job.wait(0.1)
    state, path = job.outcome()
    assert state == "done" and job.progress[0] == job.progress[1] > 0
    labels = np.load(path, allow_pickle=False)
    expected = effect.run_box(volume, request, SegmenterSpec().load("cpu"))
    assert labels.any() and np.array_equal(labels, expected)
