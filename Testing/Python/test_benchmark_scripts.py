"""The benchmark scripts run end to end on one real case each.

They produce every number in docs/results.md but are not part of the product, so nothing else
imports them: a change to the core once broke ``benchmarks/memory.py`` without any test noticing.
Each script runs here on the smallest input it accepts (one query, a small CT); what is checked
is that it finishes and writes what results.md reads, with values in a sane range. Their speed
is not judged here (benchmarks measure speed; tests do not).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from MedLSAMLib.localizers.fusion import CONFIDENCE_FEATURES, confidence

from conftest import REPO, SHARED

BENCH = REPO / "benchmarks"


def run_script(name: str, *args: str, cwd=None) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(BENCH / name), "--shared", str(SHARED), *args], cwd=cwd or BENCH,
                          capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(autouse=True)
def _shared(hn_dir):
    """Every script here reads the head-and-neck data (skips with the fixture's reason without it)."""


def test_localization_benchmark_and_its_stats(tmp_path):
    out = tmp_path / "loc"
    run_script("localization.py", "--arms", "hybrid", "--limit", "1", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["meta"]["queries_per_arm"] == {"hybrid": 1}
    for arm in ("hybrid_global", "hybrid_local", "hybrid_closed", "hybrid"):
        rows = result["summary"][arm]
        assert set(rows) == {"Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Mandible"}
        assert all(0.0 <= r["iou_mean"] <= 1.0 and r["wd_mean"] >= 0 for r in rows.values())
    # the default localizer finds these organs on a held-out scan, if not exactly
    assert sum(r["iou_mean"] for r in result["summary"]["hybrid"].values()) / 5 > 0.3
    assert len(result["presence"]) == 5  # the cropped copy of the query
    assert "| Brainstem |" in out.with_suffix(".md").read_text()
    stats = subprocess.run([sys.executable, str(BENCH / "localization_stats.py"), str(out.with_suffix(".json")),
                            "hybrid"], capture_output=True, encoding="utf-8", errors="replace")
    assert stats.returncode == 0, stats.stderr[-2000:]


def test_hybrid_ablation_reports_every_stage(tmp_path):
    dump = tmp_path / "stages.json"
    out = run_script("hybrid_ablation.py", "--limit", "1", '{"local_iterations": 40}', "--dump", str(dump))
    scores = {m[1]: (float(m[2]), float(m[3]))
              for m in re.finditer(r"^(global|local|final)\s+IoU ([\d.]+) WD ([\d.]+)", out, re.M)}
    assert set(scores) == {"global", "local", "final"}, out
    assert all(0.2 < iou <= 1.0 and wd < 30 for iou, wd in scores.values()), scores
    case = json.loads(dump.read_text())[0]
    assert len(case["stages"]["Mandible"]["per_template_local"]) == 5


def test_presence_benchmark(tmp_path):
    out = tmp_path / "presence.json"
    run_script("presence.py", "--limit", "1", "--out", str(out))
    table = json.loads(out.read_text())["thresholds"]
    assert [row["threshold"] for row in table] == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert all(row["in_scan"] + row["cut_out"] == 5 for row in table)
    # a higher threshold can only miss more and report fewer false boxes
    assert [row["missed"] for row in table] == sorted(row["missed"] for row in table)
    assert [row["false_boxes"] for row in table] == sorted((row["false_boxes"] for row in table), reverse=True)


def test_memory_benchmark_on_a_small_volume():
    out = run_script("memory.py", "--size", "96", "96", "80", "--structures", "Brainstem")
    assert re.search(r"CT \(96, 96, 80\)", out), out
    assert re.search(r"structures \['Brainstem'\]: localize \d+ s, \d+ slice\(s\) encoded", out), out
    assert "outputs written" in out


def test_segmentation_benchmark_pipeline_arm(tmp_path):
    out = tmp_path / "seg"
    run_script("segmentation.py", "--limit", "1", "--pipeline-only", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and list(rows[0]["arms"]) == ["pipeline"]
    dice = [v["dice"] for v in rows[0]["arms"]["pipeline"].values()]
    assert len(dice) == 5 and 0.3 < sum(dice) / 5 <= 1.0  # the default path segments a held-out scan
    assert "| **mean** |" in out.with_suffix(".md").read_text()


def test_point_mask_benchmark(tmp_path):
    out = tmp_path / "pm"
    run_script("point_masks.py", "--limit", "1", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 5 and all(r["dice"]["point_mask"] > r["dice"]["box"] for r in rows), rows
    assert "| **mean** |" in out.with_suffix(".md").read_text()


def test_template_kinds_and_count_benchmarks(tmp_path):
    out = tmp_path / "kinds"
    run_script("template_kinds.py", "--limit", "1", "--arms", "labels", "points", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert list(rows[0]["arms"]) == ["labels", "points"]
    for arm in ("labels", "points"):
        assert 0.4 < sum(v["dice"] for v in rows[0]["arms"][arm].values()) / 5 <= 1.0, rows
    # two runs compared case by case: the same run gives no difference; every Dice 3 points higher, +3.0 exactly
    raised = json.loads(out.with_suffix(".json").read_text())
    for v in raised["rows"][0]["arms"]["points"].values():
        v["dice"] += 0.03
    (tmp_path / "raised.json").write_text(json.dumps(raised))
    compare = subprocess.run([sys.executable, str(BENCH / "paired.py"), str(out.with_suffix(".json")),
                              str(tmp_path / "raised.json")], capture_output=True, encoding="utf-8")
    assert compare.returncode == 0, compare.stderr[-2000:]
    lines = {ln.split(" | ")[0]: ln for ln in compare.stdout.splitlines()}
    assert "| +0.0 (+0.0 to +0.0) | 0 / 0 |" in lines["| labels"], compare.stdout
    assert "| +3.0 (+3.0 to +3.0) | 5 / 0 |" in lines["| points"], compare.stdout
    out = tmp_path / "count"
    run_script("template_count.py", "--limit", "1", "--counts", "1", "2", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["kind"], r["templates"]) for r in rows] == [("labels", 1), ("labels", 2), ("points", 1), ("points", 2)]
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["iou"] <= 1.0 for r in rows)


def test_field_of_view_benchmark_and_the_confidence_fit(tmp_path):
    """Full scan and the other-region cases of one query (the slabs and cuts take minutes); then the
    calibration script fits on those rows and checks the product's weights on them."""
    if not (SHARED / "data" / "totalseg_abdomen").exists():
        pytest.skip("needs the shared abdomen CT (data/totalseg_abdomen)")
    out = tmp_path / "fov"
    run_script("field_of_view.py", "--limit", "1", "--kinds", "full", "abdomen", "--templates", "labels", "points",
               "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["summary"]) == ["default", "default/points"]  # label-map and six-point templates
    for arm in result["summary"].values():
        kinds = arm["kinds"]
        assert kinds["full"]["half_shown"] == 5 and kinds["full"]["found"] >= 4
        assert kinds["abdomen"]["structures"] == 9  # 5 head-and-neck structures on the abdomen, 4 abdominal ones here
    assert {"visible_fraction", "global_match"} <= set(result["rows"][0]["evidence"])
    fit = subprocess.run([sys.executable, str(BENCH / "confidence_fit.py"), str(out.with_suffix(".json")),
                          "--out", str(tmp_path / "fit")], capture_output=True, encoding="utf-8", errors="replace")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert len(json.loads((tmp_path / "fit.json").read_text())["weights"]) == len(CONFIDENCE_FEATURES) + 1
    check = subprocess.run([sys.executable, str(BENCH / "confidence_fit.py"), str(out.with_suffix(".json")), "--check"],
                           capture_output=True, encoding="utf-8", errors="replace")
    assert check.returncode == 0 and "Product weights" in check.stdout, check.stderr[-2000:]
    assert "| abdomen: the abdomen template on head-and-neck scans | " in check.stdout  # per case kind
    # a refit's confidences without localizing again: each present row's from its own evidence
    for row in result["rows"]:
        row["confidence"] = 0.123
    (tmp_path / "old.json").write_text(json.dumps(result))
    run_script("field_of_view.py", "--rescore", str(tmp_path / "old.json"), "--out", str(tmp_path / "new"))
    new = json.loads((tmp_path / "new.json").read_text())
    for old, row in zip(result["rows"], new["rows"]):
        assert row["iou"] == old["iou"] and row["present"] == old["present"]
        assert row["confidence"] == (round(confidence(row["evidence"], row["templates"]), 4) if row["present"] else 0.0)
    assert new["summary"]["default"]["kinds"]["full"] == result["summary"]["default"]["kinds"]["full"]


def test_scan_size_benchmark_keeps_the_median_run(tmp_path):
    out = tmp_path / "size"
    run_script("scan_size.py", "--limit", "1", "--repeat", "2", "--size", "160", "160", "100", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["meta"]["repeat"] == 2
    rows = result["rows"]
    assert [(r["size"], r["kind"]) for r in rows] == [("stored", "labels"), ("stored", "points"),
                                                      ("large", "labels"), ("large", "points")]
    assert [r["voxels"] for r in rows[2:]] == [[160, 160, 100]] * 2
    for r in rows:
        assert r["timing_s"]["total"] > 0 and 0.4 < r["dice"] <= 1.0 and 0.3 < r["box_iou"] <= 1.0, r
    assert "timed 2 time(s)" in out.with_suffix(".md").read_text()


def test_device_check_on_the_cpu_compares_like_with_like(tmp_path):
    """The GPU session's check, run with the CPU as the "device": both sides must agree exactly."""
    out = tmp_path / "device"
    run_script("device_check.py", "--device", "cpu", "--limit", "1", "--no-large", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and len(rows[0]["structures"]) == 5
    for s in rows[0]["structures"].values():
        assert s["face_difference_mm"] == 0.0 and s["iou_cpu"] == s["iou_device"] > 0.2, s
    assert "largest face difference between the two: 0.0 mm" in out.with_suffix(".md").read_text()


def test_refine_settings_and_mask_bounds_benchmarks(tmp_path):
    out = tmp_path / "refine"
    run_script("refine_settings.py", "--limit", "1", "--variants", "no learning", "affine", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 1 and set(rows[0]["scores"]) == {"labels/no learning", "labels/affine", "points/no learning",
                                                          "points/affine"}
    assert all(0.0 <= v["dice"] <= 1.0 for arm in rows[0]["scores"].values() for v in arm.values())
    assert "| no learning |" in out.with_suffix(".md").read_text()
    out = tmp_path / "bounds"
    run_script("mask_bounds.py", "--limit", "1", "--out", str(out))
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    for kind in ("labels", "points"):
        for v in row[kind].values():
            assert 0.0 <= v["fused"] <= 1.0 and 0.0 <= v["best_single"] <= 1.0 and 0.0 <= v["in_plane"] <= 1.0
    assert "| **mean** | labels |" in out.with_suffix(".md").read_text()
