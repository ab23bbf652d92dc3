"""`medlsam demo`: the README's main job, offline, on data that ships with pip packages."""
import json
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "MedLSAMLib", "demo", "--out", str(out), "--cases", "1",
                        "--device", "cpu"], capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| right lung |" in r.stdout and "seg.nrrd" in r.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["batch"] == {"ok": 1, "failed": 0, "resumed": 0}
    assert (out / "results" / "case01.seg.nrrd").exists()
    assert (out / "results" / "evaluation" / "montage.png").exists()
    # every structure was scored (none silently dropped)
    assert {r["structure"] for r in summary["rows"]} == {"right lung", "left lung", "thoracic vertebral column"}
    # every structure found by the default localizer (boxes of deformed copies of the template's CT)
    assert all(r["box_iou"] > 0.8 for r in summary["rows"]), summary["rows"]
