"""The bad-input catalogue: every kind of wrong input a user can hand MedLSAM, and the one line it
answers with. Each kind runs the real command line on real (damaged) files and checks: exit code 2,
exactly one line on stderr, "medlsam: error: " + the expected message, no traceback, and nothing
written into the output folder. The batch kinds (one damaged CT among others in `medlsam segment`)
fail only that case: exit 1, the case's failure record in summary.json, the other cases written.

README.md's "Troubleshooting" table lists every kind below (a test checks it)."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedLSAMLib import cli
from MedLSAMLib.pipeline import output_lock
from MedLSAMLib.templates import template_from_labels

from conftest import REPO, hn_case
from test_io import write_dicom_series


@dataclass
class Kind:
    id: str
    group: str
    make: object  # (ctx) -> argv (list of str); files are made under ctx.tmp
    message: str  # regular expression the one error line must match (after "medlsam: error: ")


class Context:
    def __init__(self, tmp: Path, template: Path, ct: Path, labels: Path):
        self.tmp, self.template, self.ct, self.labels = tmp, template, ct, labels
        self.out = tmp / "out"

    def file(self, name: str, data: bytes = b"") -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def image(self, name: str, image: sitk.Image) -> Path:
        path = self.tmp / name
        sitk.WriteImage(image, str(path))
        return path

    def ct_image(self) -> sitk.Image:
        return sitk.ReadImage(str(self.ct))

    def template_copy(self, edit=None) -> Path:
        """A copy of the good template; ``edit(folder, manifest)`` damages it."""
        folder = self.tmp / "tpl"
        shutil.copytree(self.template, folder)
        manifest = json.loads((folder / "template.json").read_text())
        manifest["image"] = str(self.template / manifest["image"])  # (an absolute path stays as it is)
        if edit:
            edit(folder, manifest)
        (folder / "template.json").write_text(json.dumps(manifest))
        return folder

    def localize(self, image=None, template=None, *extra) -> list[str]:
        return ["localize", "--template", str(template or self.template), "--image", str(image or self.ct),
                "--out", str(self.out / "boxes.json"), *extra]

    def segment(self, *extra, images=None) -> list[str]:
        return ["segment", "--template", str(self.template), "--image", *[str(p) for p in images or [self.ct]],
                "--out", str(self.out), *extra]


def _markups_points(folder: Path, structure: str, edit) -> None:
    path = folder / f"{structure}.mrk.json"
    doc = json.loads(path.read_text())
    edit(doc["markups"][0]["controlPoints"])
    path.write_text(json.dumps(doc))


def _truncated(path: Path, keep: float) -> bytes:
    data = path.read_bytes()
    return data[: int(len(data) * keep)]


def _damaged_inside(path: Path) -> bytes:
    """The file's bytes with 200 of them changed halfway (its end, and a gzip trailer, intact)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 200):
        data[i] ^= 0x5A
    return bytes(data)


def _pickled_code_checkpoint(ctx) -> Path:
    class Payload:
        def __reduce__(self):
            return (print, ("this ran from a checkpoint",))

    path = ctx.tmp / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    return path


def _four_d(ctx) -> Path:
    image = sitk.JoinSeries([sitk.Image([8, 8, 8], sitk.sitkInt16)] * 3)
    return ctx.image("series4d.nii.gz", image)


def _nan_ct(ctx) -> Path:
    image = sitk.Cast(ctx.ct_image(), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[:, :10] = np.nan  # (NRRD keeps NaN; ITK's NIfTI writer would zero them)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return ctx.image("nan_ct.nrrd", out)


def _mri_like(ctx) -> Path:
    image = sitk.Cast(ctx.ct_image(), sitk.sitkFloat32)
    return ctx.image("mri_like.nii.gz", sitk.RescaleIntensity(image, 0.0, 1000.0))


def _dicom(ctx, **kw) -> Path:
    return write_dicom_series(sitk.Cast(ctx.ct_image(), sitk.sitkInt16), ctx.tmp / "dicom", **kw)


def _two_series(ctx) -> Path:
    folder = _dicom(ctx)
    other = sitk.Cast(sitk.ReadImage(str(ctx.ct))[:, :, :4], sitk.sitkInt16)
    write_dicom_series(other, ctx.tmp / "second")
    for i, p in enumerate(sorted((ctx.tmp / "second").iterdir())):
        img = sitk.ReadImage(str(p))
        img.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.2")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"other_{i}.dcm"))
        writer.Execute(img)
    return folder


def _non_integer_labels(ctx) -> Path:
    labels = sitk.Cast(sitk.ReadImage(str(ctx.labels)), sitk.sitkFloat32) * 0.5
    return ctx.image("half_labels.nii.gz", labels)


def _other_grid_labels(ctx) -> Path:
    """Every other voxel in-plane: another voxel size (a label map cropped on the CT's own lattice,
    as Slicer saves segmentations, is accepted: test_templates)."""
    labels = sitk.ReadImage(str(ctx.labels))[::2, ::2, :]
    return ctx.image("coarse_labels.nii.gz", labels)


def _detached_nrrd_cut(c) -> Path:
    """A .nhdr header with its .raw data file cut in half."""
    header = c.image("d.nhdr", c.ct_image())
    raw = c.tmp / "d.raw"
    raw.write_bytes(_truncated(raw, 0.5))
    return header


def _compressed(c, name: str) -> Path:
    path = c.tmp / name
    sitk.WriteImage(c.ct_image(), str(path), True)
    return path


def _broken_manifest(c) -> Path:
    folder = c.template_copy()
    (folder / "template.json").write_text("{oops")
    return folder


def _one_structure_template(c) -> Path:
    ct, labels = hn_case("train-pats/pt_1")
    return template_from_labels(ct, labels, [(1, "Brainstem")], c.tmp / "only_brainstem").directory


def _finished_batch(c) -> Path:
    done = c.tmp / "done"
    done.mkdir()
    (done / "pt_201_ct.json").write_text(json.dumps({"status": "ok", "case": "pt_201_ct", "structures": {},
                                                    "outputs": {"labels": "pt_201_ct_labels.nii.gz"}}))
    return done


def _segment_into_file(c) -> list[str]:
    target = c.file("results.txt", b"x")
    argv = c.segment()
    argv[argv.index("--out") + 1] = str(target)
    return argv


def _from_labels(c, labels: str, structure: str) -> list[str]:
    """``template from-labels`` on the case's CT with ``labels`` and one ``--structure``."""
    return ["template", "from-labels", "--image", str(c.ct), "--labels", labels, "--structure", structure,
            "--out", str(c.out / "tpl")]


def _empty_dir(c) -> Path:
    d = c.tmp / "nothing_here"
    d.mkdir()
    return d


def _same_name_elsewhere(c) -> Path:
    d = c.tmp / "copy"
    d.mkdir()
    shutil.copy(c.ct, d / c.ct.name)
    return d / c.ct.name


KINDS = [
    # --- images ---------------------------------------------------------------------------
    Kind("image-missing", "images", lambda c: c.localize(c.tmp / "nowhere_ct.nii.gz"),
         r".*nowhere_ct\.nii\.gz: no such file or folder$"),
    Kind("image-empty-file", "images", lambda c: c.localize(c.file("empty.nii.gz")),
         r".*empty\.nii\.gz: the file is empty \(0 bytes\): an interrupted copy\? Copy the file again$"),
    Kind("image-not-an-image", "images", lambda c: c.localize(c.file("notes.nii.gz", b"patient list\n" * 50)),
         r".*notes\.nii\.gz: cannot read as a medical image: not a NIfTI, NRRD or MetaImage file \(or a folder "
         r"holding one DICOM series\)$"),
    Kind("image-truncated-nii-gz", "images",
         lambda c: c.localize(c.file("cut_ct.nii.gz", _truncated(c.ct, 1 / 3))),
         r".*cut_ct\.nii\.gz: the compressed data is damaged or ends early .*Copy the file again$"),
    Kind("image-truncated-nii", "images",
         lambda c: c.localize(c.file("cut_ct.nii", _truncated(c.image("whole.nii", c.ct_image()), 0.5))),
         r".*cut_ct\.nii: the image data ends early \([\d,]+ of [\d,]+ bytes\).*Copy the file again$"),
    Kind("image-damaged-inside-nii-gz", "images",  # ITK would read it, zeros where the damage is
         lambda c: c.localize(c.file("flipped_ct.nii.gz", _damaged_inside(c.ct))),
         r".*flipped_ct\.nii\.gz: the compressed data is damaged or ends early .*Copy the file again$"),
    Kind("image-corrupt-gzip", "images", lambda c: c.localize(c.file("bad_ct.nii.gz", b"\x1f\x8b" + b"\xff" * 300)),
         r".*bad_ct\.nii\.gz: the compressed data is damaged or ends early"),
    Kind("image-truncated-nrrd", "images",
         lambda c: c.localize(c.file("cut.nrrd", _truncated(c.image("whole.nrrd", c.ct_image()), 0.5))),
         r".*cut\.nrrd: cannot read as a medical image: its data is damaged or ends early \(an interrupted copy\?"),
    Kind("image-truncated-mha", "images",
         lambda c: c.localize(c.file("cut.mha", _truncated(c.image("whole.mha", c.ct_image()), 0.5))),
         r".*cut\.mha: cannot read as a medical image: its data is damaged or ends early \(an interrupted copy\?"),
    Kind("image-truncated-nhdr", "images", lambda c: c.localize(_detached_nrrd_cut(c)),
         r".*d\.nhdr: cannot read as a medical image: its data is damaged or ends early"),
    Kind("image-truncated-nrrd-gzip", "images",
         lambda c: c.localize(c.file("cut_gz.nrrd", _truncated(_compressed(c, "whole_gz.nrrd"), 0.5))),
         r".*cut_gz\.nrrd: cannot read as a medical image: its data is damaged or ends early"),
    Kind("image-truncated-mha-compressed", "images",
         lambda c: c.localize(c.file("cut_z.mha", _truncated(_compressed(c, "whole_z.mha"), 0.5))),
         r".*cut_z\.mha: cannot read as a medical image: its data is damaged or ends early"),
    Kind("image-2d", "images", lambda c: c.localize(c.image("slice.nrrd", c.ct_image()[:, :, 60])),
         r"slice: expected a 3D image, got 2D$"),
    Kind("image-4d", "images", lambda c: c.localize(_four_d(c)), r"series4d: expected a 3D image, got 4D$"),
    Kind("image-rgb", "images",
         lambda c: c.localize(c.image("photo.nrrd", sitk.Image([16, 16, 16], sitk.sitkVectorUInt8, 3))),
         r"photo: expected a scalar image, got 3 components per voxel$"),
    Kind("image-mri", "images", lambda c: c.localize(_mri_like(c)),
         r"mri_like: does not look like a CT in Hounsfield units .*not MRI or normalised data$"),
    Kind("image-nan", "images", lambda c: c.localize(_nan_ct(c)), r"nan_ct: 163,840 of 2,097,152 voxels are not numbers \(NaN or infinite\); not a valid CT"),
    # --- DICOM folders ----------------------------------------------------------------------
    Kind("dicom-empty-folder", "DICOM", lambda c: c.localize((c.tmp / "no_dicom").mkdir() or c.tmp / "no_dicom"),
         r".*no_dicom: folder holds no DICOM series$"),
    Kind("dicom-two-series", "DICOM", lambda c: c.localize(_two_series(c)),
         r".*dicom: folder holds 2 DICOM series; put one series per folder$"),
    Kind("dicom-missing-slice", "DICOM", lambda c: c.localize(_dicom(c, skip={64})),
         r".*dicom: DICOM series with a missing slice: 6\.00 mm between the slices at [\d.]+ and [\d.]+ mm where "
         r"the others are 3\.00 mm apart; MedLSAM needs evenly spaced slices: export the complete series"),
    Kind("dicom-uneven-spacing", "DICOM", lambda c: c.localize(_dicom(c, shift_mm={40: 1.0})),
         r".*dicom: DICOM series with uneven slice spacing \(2\.00 to 4\.00 mm\); MedLSAM needs evenly spaced"),
    Kind("dicom-duplicate-slice", "DICOM", lambda c: c.localize(_dicom(c, shift_mm={40: -3.0})),
         r".*dicom: two DICOM slices at the same position"),
    # --- templates and markups ------------------------------------------------------------------
    Kind("template-folder-missing", "templates", lambda c: c.localize(template=c.tmp / "no_template"),
         r".*no_template: no such template manifest \(not a template folder\? create one with "
         r"'medlsam template from-labels'\)$"),
    Kind("template-json-broken", "templates",
         lambda c: c.localize(template=_broken_manifest(c)),
         r".*template\.json: not a JSON template manifest \(Expecting property name enclosed in double quotes at "
         r"line 1, column 2\)$"),
    Kind("template-wrong-format", "templates",
         lambda c: c.localize(template=c.template_copy(lambda f, m: m.update(format="something-else"))),
         r".*template\.json: not a MedLSAM template manifest \(format must be 'medlsam-template'\)$"),
    Kind("template-image-missing", "templates",
         lambda c: c.localize(template=c.template_copy(lambda f, m: m.update(image=str(c.tmp / "gone_ct.nii.gz")))),
         r"template tpl: its CT .*gone_ct\.nii\.gz is missing \(moved or deleted\?\); put it back or fix 'image' "
         r"in template\.json$"),
    Kind("template-duplicate-label", "templates",
         lambda c: c.localize(template=c.template_copy(lambda f, m: m["structures"][1].update(label=1))),
         r".*template\.json: label 1 used by both Brainstem and Mandible$"),
    Kind("template-bad-terminology", "templates",
         lambda c: c.localize(template=c.template_copy(
             lambda f, m: m["structures"][0].update(terminology={"type": ["SCT", "1", "x"]}))),
         r".*template\.json: structure Brainstem: terminology needs 'category' \(\[scheme, code, meaning\]\)$"),
    Kind("template-bad-structure-name", "templates",
         lambda c: c.localize(template=c.template_copy(lambda f, m: m["structures"][0].update(name="../etc"))),
         r".*template\.json: invalid structure name '\.\./etc': use letters, digits"),
    Kind("markups-five-points", "markups",
         lambda c: c.localize(template=c.template_copy(lambda f, m: _markups_points(f, "Brainstem", lambda p: p.pop()))),
         r".*Brainstem\.mrk\.json: has 5 placed points; expected 6 \(superior, inferior, right, left, anterior, "
         r"posterior\)$"),
    Kind("markups-swapped-points", "markups",
         lambda c: c.localize(template=c.template_copy(lambda f, m: _markups_points(
             f, "Brainstem", lambda p: p.__setitem__(slice(0, 2), [
                 {**p[0], "position": p[1]["position"]}, {**p[1], "position": p[0]["position"]}])))),
         r".*Brainstem\.mrk\.json: structure Brainstem: superior point is below the inferior point"),
    Kind("markups-non-finite-point", "markups",
         lambda c: c.localize(template=c.template_copy(lambda f, m: _markups_points(
             f, "Brainstem", lambda p: p[2].__setitem__("position", [float("nan"), 0.0, 0.0])))),
         r".*Brainstem\.mrk\.json: point 'right' has a non-finite coordinate \[nan, 0\.0, 0\.0\]; place it again$"),
    Kind("markups-point-outside-image", "markups",
         lambda c: c.localize(template=c.template_copy(lambda f, m: _markups_points(
             f, "Mandible", lambda p: p[0].__setitem__("position", [0.0, 0.0, 5000.0])))),
         r"template tpl: Mandible point\(s\) superior lie outside the image$"),
    Kind("markups-not-json", "markups",
         lambda c: c.localize(template=c.template_copy(lambda f, m: (f / "Mandible.mrk.json").write_text("<xml/>"))),
         r".*Mandible\.mrk\.json: not a JSON markups file \(Expecting value at line 1, column 1\)$"),
    Kind("templates-disagree", "templates",
         lambda c: ["localize", "--template", str(c.template), str(_one_structure_template(c)), "--image",
                    str(c.ct), "--out", str(c.out / "boxes.json")],
         r"template only_brainstem: structure\(s\) Mandible not defined \(it has Brainstem\)$"),
    # --- label maps ----------------------------------------------------------------------------
    Kind("labels-non-integer", "label maps",
         lambda c: _from_labels(c, str(_non_integer_labels(c)), "1:Brainstem"),
         r".*half_labels\.nii\.gz: label map holds non-integer values; expected a label map$"),
    Kind("labels-other-grid", "label maps",
         lambda c: _from_labels(c, str(_other_grid_labels(c)), "1:Brainstem"),
         r".*coarse_labels\.nii\.gz: label map geometry differs from the image .*pt_201_ct\.nii\.gz$"),
    Kind("labels-structure-absent", "label maps",
         lambda c: _from_labels(c, str(c.labels), "9:Heart"),
         r"structure Heart \(label 9\) is absent from .*pt_201_label\.nii\.gz \(labels present: \[1, 2, 3, 4, 5, 6, 7\]\)$"),
    Kind("labels-bad-structure-spec", "label maps",
         lambda c: _from_labels(c, str(c.labels), "Brainstem"),
         r"--structure 'Brainstem': expected LABEL:NAME, e\.g\. 1:Brainstem$"),
    Kind("evaluate-reference-missing", "label maps",
         lambda c: ["evaluate", "--pred", str(_finished_batch(c)), "--labels-dir", str(c.tmp / "no_refs")],
         r".*no_refs/pt_201_ct_label\.nii\.gz: reference label map for case pt_201_ct not found"),
    # --- checkpoints -----------------------------------------------------------------------------
    Kind("checkpoint-pickled-code", "checkpoints",
         lambda c: c.localize(None, None, "--localizer", "medlam", "--medlam-checkpoint", str(_pickled_code_checkpoint(c))),
         r".*evil\.pt: refused: this MedLAM checkpoint holds objects other than weights \(possibly code\), and "
         r"MedLSAM loads weights only"),
    Kind("checkpoint-missing", "checkpoints",
         lambda c: c.localize(None, None, "--localizer", "medlam", "--medlam-checkpoint", str(c.tmp / "none.pt")),
         r".*none\.pt: no such MedLAM checkpoint file$"),
    Kind("checkpoint-not-torch", "checkpoints",
         lambda c: c.localize(None, None, "--localizer", "medlam", "--medlam-checkpoint",
                              str(c.file("notes.pt", b"not weights"))),
         r".*notes\.pt: not a PyTorch weights file \(MedLAM checkpoint\); check the path"),
    Kind("sam-without-checkpoint", "checkpoints", lambda c: c.segment("--segmenter", "sam-vit-b"),
         r"--segmenter sam-vit-b needs --segmenter-checkpoint PATH \(ViT-B weights are not shipped\)$"),
    # --- output folders and option combinations ----------------------------------------------------
    Kind("out-is-a-file", "output folders", _segment_into_file,
         r".*results\.txt: --out must be a folder, and this is a file$"),
    Kind("out-busy", "output folders", lambda c: c.segment(),
         r".*out: another medlsam batch is writing into this folder; wait for it to finish or choose another --out$"),
    Kind("images-dir-empty", "output folders",
         lambda c: ["segment", "--template", str(c.template), "--images-dir", str(_empty_dir(c)), "--out", str(c.out)],
         r".*nothing_here: no CT files in this folder"),
    Kind("duplicate-case-names", "option combinations",
         lambda c: c.segment(images=[c.ct, _same_name_elsewhere(c)]),
         r"two inputs share the case name 'pt_201_ct'; outputs would overwrite each other$"),
    Kind("slice-step-zero", "option combinations", lambda c: c.segment("--slice-step", "0"),
         r"--slice-step must be 1 or more$"),
    Kind("prior-weight-out-of-range", "option combinations", lambda c: c.segment("--prior-weight", "2"),
         r"--prior-weight must be between 0 and 1$"),
    Kind("scheduler-without-dask", "option combinations", lambda c: c.segment("--scheduler", "tcp://x:1"),
         r"--scheduler and --workers are for --executor dask$"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory, hn_dir):
    ct, labels = hn_case("train-pats/pt_1")
    folder = tmp_path_factory.mktemp("good") / "tpl"
    template_from_labels(ct, labels, [(1, "Brainstem"), (7, "Mandible")], folder)
    return folder, hn_case("validation-pats/pt_201")


@pytest.mark.parametrize("kind", KINDS, ids=[k.id for k in KINDS])
def test_bad_input_gets_one_clear_line(kind, good, tmp_path, capfd):
    template, (ct, labels) = good
    ctx = Context(tmp_path, template, ct, labels)
    argv = kind.make(ctx)
    capfd.readouterr()  # (file descriptors: what ITK prints from C++ counts too)
    if kind.id == "out-busy":
        ctx.out.mkdir()
        with output_lock(ctx.out):
            rc = cli.main(argv)
    else:
        rc = cli.main(argv)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("medlsam: error: "), err
    assert re.match(kind.message, lines[0][len("medlsam: error: "):]), lines[0]
    assert not ctx.out.exists() or not any(ctx.out.iterdir()), "nothing written into the output folder"


def test_the_catalogue_has_30_kinds_and_the_readme_lists_each():
    assert len(KINDS) >= 30 and len({k.id for k in KINDS}) == len(KINDS)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Troubleshooting"):]
    missing = [k.id for k in KINDS if f"`{k.id}`" not in section]
    assert not missing, f"README Troubleshooting lacks {missing}"


def test_damaged_cases_in_a_batch_fail_alone(good, tmp_path, capsys):
    """`medlsam segment` over a cohort with damaged scans: exit 1, each damaged case recorded as failed
    with its one-line reason in summary.json, the good case written, nothing else in the folder."""
    template, (ct, labels) = good
    ctx = Context(tmp_path, template, ct, labels)
    damaged = {
        "cut_ct": ctx.file("cut_ct.nii.gz", _truncated(ct, 1 / 3)),
        "dicom": _dicom(ctx, skip={64}),
        "nan_ct": _nan_ct(ctx),
        "mri_like": _mri_like(ctx),
    }
    rc = cli.main(ctx.segment(images=[damaged["cut_ct"], ct, damaged["dicom"], damaged["nan_ct"],
                                      damaged["mri_like"]]))
    assert rc == 1, capsys.readouterr().err
    summary = json.loads((ctx.out / "summary.json").read_text())
    status = {c["case"]: (c["status"], c["error"]) for c in summary["cases"]}
    assert status["pt_201_ct"] == ("ok", None)
    assert "damaged or ends early" in status["cut_ct"][1] and "missing slice" in status["dicom"][1]
    assert "not numbers" in status["nan_ct"][1] and "does not look like a CT" in status["mri_like"][1]
    assert all(status[name][0] == "failed" and "Traceback" not in status[name][1] for name in damaged)
    assert not any(c["traceback"] for c in summary["cases"]), "user errors carry no traceback"
    assert sorted(p.name for p in ctx.out.iterdir()) == [
        "pt_201_ct.json", "pt_201_ct.seg.nrrd", "pt_201_ct_labels.nii.gz", "summary.json"]
