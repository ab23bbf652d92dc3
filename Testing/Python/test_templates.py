import json

import jsonschema
import numpy as np
import pytest

from MedLSAMLib import io
from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import POINT_NAMES, extreme_points_from_box, lps_to_ras, point_axis
from MedLSAMLib.markups import read_markups, write_markups
from MedLSAMLib.templates import (Structure, Template, extreme_points_from_mask, load_template, read_color_table,
                                  save_template, template_from_labels)

from conftest import CORE5, hn_case, phantom


@pytest.fixture(scope="module")
def pt1_template(tmp_path_factory):
    ct, labels = hn_case("train-pats/pt_1")
    out = tmp_path_factory.mktemp("pt1")
    template_from_labels(ct, labels, CORE5, out)
    return out, ct, labels


def test_from_labels_writes_schema_valid_markups(pt1_template, markups_schema):
    out, _, _ = pt1_template
    files = sorted(p.name for p in out.glob("*.mrk.json"))
    assert files == sorted(f"{name}.mrk.json" for _, name in CORE5)
    for f in files:
        jsonschema.validate(json.loads((out / f).read_text()), markups_schema)


def test_from_labels_points_lie_on_structure_boundaries(pt1_template):
    out, _, labels_path = pt1_template
    labels = io.read_labels(labels_path)
    geom = labels.geometry
    template = load_template(out)
    assert [s.name for s in template.structures.values()] == [n for _, n in CORE5]
    for label, name in CORE5:
        s = template.structures[name]
        assert s.label == label
        mask = labels.array == label
        lps_all = geom.ijk_to_lps(np.argwhere(mask)[:, ::-1].astype(float))
        for n, pname in enumerate(POINT_NAMES):
            ijk = geom.lps_to_ijk(s.points[n])
            assert np.allclose(ijk, np.rint(ijk), atol=1e-4), "point is a voxel centre"
            i, j, k = np.rint(ijk).astype(int)
            assert mask[k, j, i], f"{name} {pname} point is on the structure"
            axis, sign = point_axis(pname)
            # it is the extreme along its own axis ...
            assert sign * s.points[n, axis] == pytest.approx((sign * lps_all[:, axis]).max(), abs=1e-3)
            # ... so one step further in that direction leaves the structure (a boundary voxel)
            step = np.zeros(3)
            step[axis] = sign * geom.spacing.max()
            ni, nj, nk = np.rint(geom.lps_to_ijk(s.points[n] + step)).astype(int)
            inside = 0 <= ni < geom.size[0] and 0 <= nj < geom.size[1] and 0 <= nk < geom.size[2]
            assert not inside or not mask[nk, nj, ni]


def test_template_round_trip_and_ras_markups(tmp_path, geometry):
    vol = phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 8.0)
    io.write_volume(vol, tmp_path / "ct.nii.gz")
    centre = geometry.ijk_to_lps([20, 15, 10])
    pts = extreme_points_from_box(np.stack([centre - 5, centre + 5]))
    t = Template(tmp_path / "ct.nii.gz", {"Ball": Structure("Ball", 3, pts, window=(-100, 200))})
    save_template(t, tmp_path / "tpl")
    back = load_template(tmp_path / "tpl")
    assert np.allclose(back.structures["Ball"].points, pts)
    assert back.structures["Ball"].window == (-100.0, 200.0)
    back.load_image()  # points inside the image: no error
    # the same points written by Slicer in RAS read back identically
    doc = json.loads((tmp_path / "tpl" / "Ball.mrk.json").read_text())
    doc["markups"][0]["coordinateSystem"] = "RAS"
    for cp in doc["markups"][0]["controlPoints"]:
        cp["position"] = lps_to_ras(cp["position"]).tolist()
    doc["markups"][0]["controlPoints"].reverse()  # order in file must not matter
    (tmp_path / "ras.mrk.json").write_text(json.dumps(doc))
    _, ras_points = read_markups(tmp_path / "ras.mrk.json")
    assert np.allclose(ras_points, pts)


def test_extreme_points_on_oblique_grid(geometry):
    centre = geometry.ijk_to_lps([20, 15, 10])
    ball = phantom(geometry, centre, 9.0, inside=1, outside=0)
    pts = extreme_points_from_mask(ball.array > 0, geometry)
    for n, name in enumerate(POINT_NAMES):
        axis, sign = point_axis(name)
        # each extreme lies ~one radius from the centre along its axis, within a voxel diagonal
        assert sign * (pts[n, axis] - centre[axis]) == pytest.approx(9.0, abs=float(np.linalg.norm(geometry.spacing)))


def _write_points(path, points, labels=POINT_NAMES):
    write_markups(path, "S", points)
    doc = json.loads(path.read_text())
    for cp, label in zip(doc["markups"][0]["controlPoints"], labels):
        cp["label"] = label
    path.write_text(json.dumps(doc))


@pytest.fixture
def small_template(tmp_path):
    from MedLSAMLib.geometry import Geometry

    geom = Geometry([0, 0, 0], [1, 1, 1], np.eye(3), (30, 30, 30))
    io.write_volume(phantom(geom, [15, 15, 15], 6.0), tmp_path / "ct.nrrd")
    pts = extreme_points_from_box([[10, 10, 10], [20, 20, 20]])
    t = Template(tmp_path / "ct.nrrd", {"S": Structure("S", 1, pts)})
    save_template(t, tmp_path / "tpl")
    return tmp_path / "tpl", pts


def test_bad_markups_give_one_line_errors(small_template):
    tpl, pts = small_template
    mrk = tpl / "S.mrk.json"
    doc = json.loads(mrk.read_text())
    doc["markups"][0]["controlPoints"].pop()
    mrk.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="has 5 placed points; expected 6"):
        load_template(tpl)
    _write_points(mrk, pts, labels=list(POINT_NAMES[:5]) + ["top"])
    with pytest.raises(InputError, match="unknown point name 'top'"):
        load_template(tpl)
    swapped = pts.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    _write_points(mrk, swapped)
    with pytest.raises(InputError, match="superior point is below the inferior point"):
        load_template(tpl)
    mrk.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON markups file"):
        load_template(tpl)
    _write_points(mrk, pts + np.array([0, 0, 100.0]))  # points outside the image
    with pytest.raises(InputError, match="outside the image"):
        load_template(tpl).load_image()


def test_structure_absent_from_label_map(tmp_path):
    ct, labels = hn_case("train-pats/pt_1")
    with pytest.raises(InputError, match=r"Larynx \(label 6\) is absent"):
        template_from_labels(ct, labels, [(6, "Larynx")], tmp_path / "t")


def test_manifest_cannot_point_outside_folder(small_template):
    tpl, _ = small_template
    manifest = json.loads((tpl / "template.json").read_text())
    manifest["structures"][0]["points"] = "../../etc/passwd"
    (tpl / "template.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="file name inside the template folder"):
        load_template(tpl)


def test_template_requires_named_structures(small_template):
    tpl, _ = small_template
    with pytest.raises(InputError, match="Mandible not defined"):
        load_template(tpl).require(["S", "Mandible"])


@pytest.mark.parametrize("name, code, side", [
    ("RightParotid", "45289007", "Right"), ("Parotid_L", "45289007", "Left"), ("left lung", "39607008", "Left"),
    ("Brain Stem", "15926001", None), ("SpinalCord", "2748008", None), ("Esophagus", "32849002", None),
    ("oesophagus", "32849002", None), ("Mandible", "91609006", None), ("Larynx", "4596009", None),
    ("Kidney_R", "64033007", "Right"), ("liver", "10200004", None), ("Lung", "39607008", None),
])
def test_known_structure_names_get_standard_terminology(name, code, side):
    from MedLSAMLib.terminology import terminology_for

    entry = terminology_for(name)
    assert entry["category"] == ["SCT", "123037004", "Anatomical Structure"] and entry["type"][1] == code
    assert (entry.get("typeModifier") or [None, None, None])[2] == side


def test_unknown_names_get_none_and_the_spine_gets_its_region():
    from MedLSAMLib.terminology import terminology_for

    assert terminology_for("Tumour") is None and terminology_for("GTV_1") is None
    assert terminology_for("Right") is None  # a side alone is not a structure
    spine = terminology_for("thoracic vertebral column")
    assert spine["type"][2] == "Vertebra" and spine["anatomicRegion"] == ["SCT", "122495006", "Thoracic spine"]
    assert terminology_for("Brainstem").get("typeModifier") is None  # unpaired: no side even if named


def test_bad_terminology_in_a_template_names_file_and_structure(tmp_path):
    import json

    ct, labels = hn_case("train-pats/pt_1")
    template_from_labels(ct, labels, [(1, "Brainstem")], tmp_path)
    manifest = json.loads((tmp_path / "template.json").read_text())
    assert manifest["structures"][0]["terminology"]["type"] == ["SCT", "15926001", "Brainstem"]
    for bad, message in (({"type": ["SCT", "1", "x"]}, "needs 'category'"),
                         ({"category": ["SCT", "1"], "type": ["SCT", "1", "x"]}, "three strings"),
                         ({"category": ["SCT", "1", "a~b"], "type": ["SCT", "1", "x"]}, "must not contain"),
                         ({"category": ["SCT", "1", "a"], "type": ["SCT", "1", "x"], "exec": "x"}, "unknown"),
                         ("Brainstem", "must be an object")):
        manifest["structures"][0]["terminology"] = bad
        (tmp_path / "template.json").write_text(json.dumps(manifest))
        with pytest.raises(InputError, match=message) as exc:
            load_template(tmp_path)
        assert "template.json" in str(exc.value) and "Brainstem" in str(exc.value)


def test_a_label_map_cropped_on_the_cts_own_voxels_is_placed_back_on_its_grid(tmp_path):
    """Slicer saves a segmentation cropped to its content; the voxels are the CT's, so the
    template is the one the whole label map gives, with the label map written on the CT's grid."""
    import SimpleITK as sitk

    ct, labels = hn_case("train-pats/pt_1")
    whole = template_from_labels(ct, labels, [(7, "Mandible")], tmp_path / "whole")
    cropped = tmp_path / "cropped.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(labels))[10:110, 20:120, 30:], str(cropped))
    made = template_from_labels(ct, cropped, [(7, "Mandible")], tmp_path / "made")
    assert np.allclose(made.structures["Mandible"].points, whole.structures["Mandible"].points)
    back = load_template(tmp_path / "made").load_labels()
    assert back.geometry.is_close(io.read_ct(ct).geometry, atol=1e-3)
    assert np.array_equal(back.array == 7, io.read_labels(labels).array == 7)


@pytest.mark.parametrize("kind", ["slicer", "itksnap"])
def test_a_label_map_with_a_colour_table_names_its_structures(tmp_path, kind):
    """A plain label map with its colour table (Slicer .ctbl, or ITK-SNAP label descriptions)
    becomes a template with no --structure: every label in the map that the table names, with
    the table's name and colour; labels the map lacks (5, 6 are absent here: 9) are skipped."""
    ct, labels = hn_case("train-pats/pt_1")
    table = tmp_path / "colors.txt"
    if kind == "slicer":
        table.write_text("# Color table file colors.ctbl\n# 4 values\n0 Background 0 0 0 0\n1 Brainstem 255 0 0 255\n"
                         "7 Lower jaw 0 128 255 255\n9 Heart 10 10 10 255\n")
    else:
        table.write_text('################################################\n# ITK-SNAP Label Description File\n'
                         '    0     0    0    0        0  0  0    "Clear Label"\n'
                         '    1   255    0    0        1  1  1    "Brainstem"\n'
                         '    7     0  128  255        1  1  1    "Lower jaw"\n'
                         '    9    10   10   10        1  1  1    "Heart"\n')
    template = template_from_labels(ct, labels, [], tmp_path / "t", color_table=table)
    assert [(s.name, s.label, s.color) for s in template.structures.values()] == \
        [("Brainstem", 1, (1.0, 0.0, 0.0)), ("Lower jaw", 7, (0.0, 0.502, 1.0))]
    reference = io.read_labels(labels)
    assert np.allclose(template.structures["Lower jaw"].points,
                       extreme_points_from_mask(reference.array == 7, reference.geometry))
    renamed = template_from_labels(ct, labels, [(7, "Mandible")], tmp_path / "r", color_table=table)
    assert [(s.name, s.color) for s in renamed.structures.values()] == [("Mandible", (0.0, 0.502, 1.0))]
    table.write_text("1 Brainstem red\n")
    with pytest.raises(InputError, match=r"colors\.txt, line 1: expected 'value name R G B A'"):
        template_from_labels(ct, labels, [], tmp_path / "bad", color_table=table)


def test_slicers_csv_colour_table_is_read(tmp_path):
    table = tmp_path / "colors.csv"
    table.write_text("LabelValue,Name,Color_R,Color_G,Color_B,Color_A,Category_CodingSchemeDesignator\n"
                     "0,background,0,0,0,0,\n1,Brainstem,255,0,0,255,SCT\n2,Spinal cord,0,255,0,255,SCT\n")
    assert read_color_table(table) == {1: ("Brainstem", (1.0, 0.0, 0.0), None),
                                       2: ("Spinal cord", (0.0, 1.0, 0.0), None)}
    table.write_text("LabelValue,Name,Color_R,Color_G,Color_B\nx,Brainstem,1,2,3\n")
    with pytest.raises(InputError, match=r"colors\.csv, line 2: expected"):
        read_color_table(table)
    table.write_text("LabelValue,Name,Color_R,Color_G,Color_B\n1,Brainstem,1,2,3\n2,Mandible,4\n")  # a short row
    with pytest.raises(InputError, match=r"colors\.csv, line 3: expected"):
        read_color_table(table)
