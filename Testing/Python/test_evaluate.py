import json
import math

import numpy as np
import pytest

from MedLSAMLib.evaluate import dice, evaluate, hd95, summarize
from MedLSAMLib.geometry import Geometry
from MedLSAMLib.io import Volume, write_volume


def ball(shape, centre, r):
    z, y, x = np.indices(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= r * r


def test_dice_and_hd95_known_values():
    a = ball((40, 40, 40), (20, 20, 20), 8)
    assert dice(a, a) == 1.0 and hd95(a, a, (1, 1, 1)) == 0.0
    b = ball((40, 40, 40), (20, 20, 23), 8)  # shifted 3 voxels along x
    assert 0.5 < dice(a, b) < 0.9
    h = hd95(a, b, (1.0, 1.0, 2.0))  # x voxels are 2 mm: the shift is 6 mm
    assert 4.0 <= h <= 6.5
    assert dice(np.zeros_like(a), a) == 0.0 and math.isnan(hd95(np.zeros_like(a), a, (1, 1, 1)))


def test_empty_prediction_counts_as_zero_and_is_not_dropped(tmp_path):
    geom = Geometry([0, 0, 0], [1, 1, 1], np.eye(3), (30, 30, 30))
    gt = np.zeros((30, 30, 30), np.uint8)
    gt[ball((30, 30, 30), (15, 15, 15), 5)] = 3
    gt[ball((30, 30, 30), (5, 5, 5), 3)] = 4
    pred = np.where(gt == 3, 3, 0).astype(np.uint8)  # structure 4 missed entirely
    (tmp_path / "labels").mkdir()
    write_volume(Volume(gt, geom, "gt"), tmp_path / "labels" / "c1_label.nii.gz")
    write_volume(Volume(pred, geom, "p"), tmp_path / "pred" / "c1_labels.nii.gz")
    box = [[10.0, 10.0, 10.0], [20.0, 20.0, 20.0]]
    rec = {"case": "c1", "status": "ok", "image": "missing.nii.gz", "outputs": {"labels": "c1_labels.nii.gz"},
           "structures": {"A": {"label": 3, "present": True, "confidence": 0.9, "box_lps": box},
                          "B": {"label": 4, "present": False, "confidence": 0.0, "box_lps": box}}}
    (tmp_path / "pred" / "c1.json").write_text(json.dumps(rec))
    rows = evaluate(tmp_path / "pred", tmp_path / "labels")
    by = {r["structure"]: r for r in rows}
    assert by["A"]["dice"] == pytest.approx(1.0) and by["A"]["box_iou"] == pytest.approx(1.0)
    assert by["B"]["dice"] == 0.0 and by["B"]["note"] == "empty prediction"
    s = summarize(rows)
    assert s["B"]["n"] == 1 and s["B"]["empty"] == 1 and s["B"]["dice_mean"] == 0.0
    for name in ("metrics.csv", "metrics.md", "boxplots.png", "montage.png", "summary.json"):
        assert (tmp_path / "pred" / "evaluation" / name).stat().st_size > 0
