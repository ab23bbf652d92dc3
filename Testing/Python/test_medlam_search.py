"""Landmark search with the shipped checkpoint on real head-and-neck CT."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import POINT_NAMES, Geometry, box_lps_to_ijk, point_axis
from MedLSAMLib.io import Volume, read_ct
from MedLSAMLib.localizers.medlam import MedLAMLocalizer
from MedLSAMLib.medlam.checkpoint import DEFAULT_CHECKPOINT, load_medlam
from MedLSAMLib.medlam.search import LandmarkSearch

from conftest import hn_case, hn_template

torch.set_num_threads(2)
STRUCTURES = [(1, "Brainstem"), (2, "SpinalCord"), (7, "Mandible")]


@pytest.fixture(scope="module")
def pt1_template(tmp_path_factory):
    return hn_template("train-pats/pt_1", STRUCTURES, tmp_path_factory.mktemp("tpl_pt1"))


@pytest.fixture(scope="module")
def wpl(pt1_template):
    return MedLAMLocalizer([pt1_template], mode="wpl", device="cpu")


def shifted(volume: Volume, shift_ijk) -> Volume:
    """The same geometry with the content moved by whole voxels (air fills the gap)."""
    arr = np.full_like(volume.array, -1024.0)
    di, dj, dk = shift_ijk
    src = volume.array[max(0, -dk):volume.array.shape[0] - max(0, dk),
                       max(0, -dj):volume.array.shape[1] - max(0, dj),
                       max(0, -di):volume.array.shape[2] - max(0, di)]
    arr[max(0, dk):max(0, dk) + src.shape[0], max(0, dj):max(0, dj) + src.shape[1],
        max(0, di):max(0, di) + src.shape[2]] = src
    return volume.with_array(arr)


def test_shift_of_the_template_itself_is_recovered(wpl):
    """Query = template CT with its content moved; found points = template points + the shift."""
    template = wpl.templates[0]
    ct = template.load_image()
    d = np.array([3, -4, 5])  # original voxels (i, j, k) -> about 12-16 mm each way
    shift_lps = ct.geometry.direction @ (ct.geometry.spacing * d)
    res = wpl.localize(shifted(ct, d))
    errors, moved = [], []
    for name, s in template.structures.items():
        found = np.array(res.structures[name].extreme_points_lps)
        expected = s.points + shift_lps
        moved.append(found - s.points)
        for n, pname in enumerate(POINT_NAMES):
            axis, _ = point_axis(pname)
            errors.append(abs(found[n, axis] - expected[n, axis]))
    errors = np.array(errors)
    recovered = np.concatenate(moved).mean(axis=0)
    # The shift (about 16, 12, 12 mm) is recovered within one canonical voxel (3 mm) ...
    assert np.linalg.norm(recovered - shift_lps) <= 3.0, (recovered, shift_lps)
    # ... and so are the box walls on average; single points can be a voxel or two off, because
    # U-Net features on whole-voxel patches are not exactly shift-equivariant.
    assert errors.mean() <= 3.0 and np.median(errors) <= 3.0 and errors.max() <= 9.0, errors.round(1)


def test_result_format_and_geometry(wpl):
    ct_path, _ = hn_case("validation-pats/pt_201")
    ct = read_ct(ct_path)
    res = wpl.localize(ct)
    assert res.image == str(ct_path)
    assert set(res.timing_s) >= {"preprocess", "total_query"}
    for name, r in res.structures.items():
        assert isinstance(r.present, bool) and 0.0 <= r.confidence <= 1.0
        (i0, j0, k0), (i1, j1, k1) = r.box_ijk
        assert all(isinstance(v, int) for v in (i0, j0, k0, i1, j1, k1))
        assert 0 <= i0 <= i1 < ct.geometry.size[0] and 0 <= k0 <= k1 < ct.geometry.size[2]
        assert r.box_ijk == box_lps_to_ijk(np.array(r.box_lps), ct.geometry).tolist()
        assert len(r.extreme_points_lps) == 6 and len(r.sub_boxes_ijk) == 1


def test_spl_gives_stacked_sub_boxes(pt1_template):
    loc = MedLAMLocalizer([pt1_template], mode="spl", device="cpu", structures=["SpinalCord"])
    assert loc.support.parts["SpinalCord"] == 6  # 180 mm cord, 6 mm parts, capped at 6
    res = loc.localize(hn_case("validation-pats/pt_202")[0])
    subs = np.array(res.structures["SpinalCord"].sub_boxes_lps)
    assert subs.shape == (6, 2, 3)
    # parts are ordered from inferior to superior (LPS z grows with the part index)
    centres = subs[:, :, 2].mean(1)
    assert np.corrcoef(np.arange(6), centres)[0, 1] > 0.5


def test_structure_outside_field_of_view_is_absent(wpl):
    """Crop the query to the top of the head: the mandible and spinal cord are not in it."""
    template = wpl.templates[0]
    ct = template.load_image()
    brainstem_top = ct.geometry.lps_to_ijk(template.structures["Brainstem"].point("superior"))[2]
    keep_to = int(brainstem_top) + 2  # k runs foot-wards in this file
    arr = ct.array[:keep_to]
    geom = Geometry(ct.geometry.origin, ct.geometry.spacing, ct.geometry.direction,
                    (ct.geometry.size[0], ct.geometry.size[1], arr.shape[0]))
    res = wpl.localize(Volume(np.ascontiguousarray(arr), geom, "head_top"))
    assert res.structures["Mandible"].present is False
    assert res.structures["Mandible"].confidence == 0.0


def test_air_only_image_is_rejected(wpl):
    geom = Geometry([0, 0, 0], [3, 3, 3], np.eye(3), (40, 40, 40))
    with pytest.raises(InputError, match="no body found"):
        wpl.localize(Volume(np.full((40, 40, 40), -1000.0, np.float32), geom, "air"))


def test_localize_cli_writes_boxes_json(pt1_template, tmp_path):
    out = tmp_path / "boxes.json"
    ct, _ = hn_case("validation-pats/pt_201")
    r = subprocess.run([sys.executable, "-m", "MedLSAMLib", "localize", "--template", str(pt1_template),
                        "--image", str(ct), "--out", str(out), "--device", "cpu", "--localizer", "medlam"],
                       capture_output=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["structures"]) == {n for _, n in STRUCTURES}
    for entry in doc["structures"].values():
        assert {"label", "present", "confidence", "box_ijk", "box_lps", "sub_boxes_ijk",
                "extreme_points_lps"} <= set(entry)
    assert "Brainstem" in r.stdout


def test_shipped_checkpoint_is_small_and_verified():
    assert DEFAULT_CHECKPOINT.stat().st_size < 25 * 1024 * 1024
    model = load_medlam()
    assert model.config.base_channels == 8
    loc = LandmarkSearch(model)
    assert loc.scales == (4, 2)
