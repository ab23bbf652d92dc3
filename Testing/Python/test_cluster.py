"""The Dask executor on real CTs: same label maps as the local executor, a killed worker loses no case."""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed", reason="dask.distributed not installed (pip install '.[distributed]')")

from MedLSAMLib.cluster import run_cohort_dask  # noqa: E402
from MedLSAMLib.settings import RunSettings  # noqa: E402
from MedLSAMLib.io import read_labels  # noqa: E402
from MedLSAMLib.localizers import LocalizerSpec  # noqa: E402
from MedLSAMLib.pipeline import run_cohort  # noqa: E402

from conftest import hn_case, hn_template  # noqa: E402
from segmenters import SlowThresholdSegmenter, ThresholdSegmenter  # noqa: E402


def slow_threshold_segmenter(device):  # top level: pickled by reference and imported on the workers
    return SlowThresholdSegmenter()


def threshold_segmenter(device):
    return ThresholdSegmenter()


CASES = ["validation-pats/pt_201", "validation-pats/pt_202", "validation-pats/pt_203"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    tpl = hn_template("train-pats/pt_1", [(7, "Mandible"), (2, "SpinalCord")], tmp_path_factory.mktemp("tpl"))
    return tpl


def _case(path):
    return path.name[: -len(".nii.gz")]


def test_local_cluster_matches_local_executor_and_survives_a_killed_worker(template, tmp_path):
    images = [hn_case(c)[0] for c in CASES]
    bad = tmp_path / "broken_ct.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")

    # reference: the local executor, one torch thread like each worker below
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = RunSettings((str(template),), LocalizerSpec(mode="wpl", device="cpu"), segmenter=threshold_segmenter)
        run_cohort(local.build(), images, tmp_path / "local", show_progress=False)
    finally:
        torch.set_num_threads(threads)

    settings = RunSettings((str(template),), LocalizerSpec(mode="wpl", device="cpu"), segmenter=slow_threshold_segmenter)
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=run_cohort_dask(
            settings, [images[0], bad, *images[1:]], out, client=client, show_progress=False)))
        runner.start()
        victim = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and runner.is_alive():
            busy = [w for w, keys in client.processing().items() if any(str(k).startswith("medlsam-pt_") for k in keys)]
            if busy:
                time.sleep(1.0)  # let the case get under way
                victim = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                assert not list(out.glob("*.json")), "a case finished before the kill; slow the segmenter down"
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.1)
        runner.join(timeout=600)
        assert victim is not None, "no worker was ever busy with a case"
        assert victim not in client.run(os.getpid).values(), "the killed worker is gone (the nanny started a new one)"

    summary = json.loads((out / "summary.json").read_text())
    assert result["summary"].counts == summary["counts"] == {"ok": 3, "failed": 1, "resumed": 0}
    assert summary["executor"] == "dask"
    assert [c["case"] for c in summary["cases"]] == ["pt_201_ct", "broken_ct", "pt_202_ct", "pt_203_ct"]
    assert "damaged or ends early" in summary["cases"][1]["error"]  # gzip magic, then junk
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no temporary files left"
    for path in images:
        mine = read_labels(out / f"{_case(path)}_labels.nii.gz")
        ref = read_labels(tmp_path / "local" / f"{_case(path)}_labels.nii.gz")
        assert mine.array.any() and np.array_equal(mine.array, ref.array)
        assert np.allclose(mine.geometry.ijk_to_lps_matrix, ref.geometry.ijk_to_lps_matrix)


def test_resume_under_dask_skips_complete_cases_without_starting_a_cluster(template, tmp_path):
    images = [hn_case(c)[0] for c in CASES[:2]]
    settings = RunSettings((str(template),), LocalizerSpec(mode="wpl", device="cpu"), segmenter=threshold_segmenter)
    run_cohort(settings.build(), images, tmp_path, show_progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    summary = run_cohort_dask(settings, images, tmp_path, resume=True, scheduler="tcp://127.0.0.1:1",  # never contacted
                              show_progress=False)
    assert summary.counts == {"ok": 2, "failed": 0, "resumed": 2}
    assert all(before[p.name] == p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "summary.json")
