"""The benchmark analysis scripts that read earlier runs (no CT needed): given rows whose answer
is known, they print it."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

BENCH = REPO / "benchmarks"


def _row(kind, case, structure, iou, shown=1.0, present=True, arm="default"):
    return {"arm": arm, "kind": kind, "case": case, "structure": structure, "shown": shown, "present": present,
            "confidence": 0.9, "iou": iou, "evidence": {}, "templates": 5}


def test_fov_misses_splits_by_the_full_scan(tmp_path):
    rows = [_row("full", "a", "Cord", 0.6), _row("full", "a", "Gland", 0.3), _row("full", "b", "Cord", 0.5),
            _row("slab80", "a", "Cord", 0.45), _row("slab80", "a", "Gland", 0.5),  # found both
            _row("slab80", "b", "Cord", 0.35),  # missed where the full scan found it: the field of view's miss
            _row("slab80", "b", "Cord", 0.9, shown=0.3),  # shows under half: not counted
            _row("slab120", "a", "Cord", 0.8, present=False)]  # reported absent: a miss
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": rows}))
    out = subprocess.run([sys.executable, str(BENCH / "fov_misses.py"), str(path)], capture_output=True,
                         encoding="utf-8")
    assert out.returncode == 0, out.stderr
    assert "| slab80 | 1 / 2 (50 %) | 1 / 1 |" in out.stdout, out.stdout
    assert "| slab120 | 0 / 1 (0 %) | 0 / 0 |" in out.stdout, out.stdout
    listed = out.stdout.split("missed where the full scan found it:")[1].split()
    assert listed.count("slab80") == 1 and listed.count("slab120") == 1, out.stdout
