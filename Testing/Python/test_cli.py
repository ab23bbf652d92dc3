import subprocess
import sys

import pytest

from MedLSAMLib import __version__
from MedLSAMLib.cli import main

from conftest import hn_case

SUBCOMMANDS = ["template", "localize", "segment", "evaluate", "train", "demo"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "MedLSAMLib", *args], capture_output=True, encoding="utf-8", errors="replace")


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"medlsam {__version__}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: medlsam " + command in capsys.readouterr().out


def test_usage_error_is_one_line_exit_2():
    r = run_cli("template", "from-labels", "--image", "x.nii.gz")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "required" in r.stderr


def test_user_error_is_one_line_no_traceback(tmp_path):
    ct, labels = hn_case("train-pats/pt_1")
    r = run_cli("template", "from-labels", "--image", str(ct), "--labels", str(labels),
                "--structure", "9:Nothing", "--out", str(tmp_path / "t"))
    assert r.returncode == 2
    assert r.stderr.startswith("medlsam: error: structure Nothing (label 9) is absent")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_cli("template", "from-labels", "--image", str(tmp_path / "none.nii.gz"), "--labels", str(labels),
                "--structure", "1:Brainstem", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run_cli("template", "from-labels", "--image", str(ct), "--labels", str(labels),
                "--structure", "Brainstem", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "expected LABEL:NAME" in r.stderr


def test_template_from_labels_then_check(tmp_path):
    ct, labels = hn_case("train-pats/pt_1")
    out = tmp_path / "tpl"
    assert main(["template", "from-labels", "--image", str(ct), "--labels", str(labels),
                 "--structure", "1:Brainstem", "--structure", "7:Mandible", "--out", str(out)]) == 0
    r = run_cli("template", "check", str(out))
    assert r.returncode == 0 and "Mandible" in r.stdout and r.stdout.strip().endswith("ok")


def test_cluster_options_need_the_dask_executor(tmp_path, capsys):
    ct, _ = hn_case("validation-pats/pt_201")
    code = main(["segment", "--template", str(tmp_path), "--image", str(ct), "--out", str(tmp_path / "o"),
                 "--workers", "2"])
    assert code == 2 and "--scheduler and --workers are for --executor dask" in capsys.readouterr().err


def test_dask_executor_without_dask_installed_is_a_one_line_error(monkeypatch):
    import importlib

    from MedLSAMLib.errors import InputError

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask.distributed were not installed
    monkeypatch.delitem(sys.modules, "MedLSAMLib.cluster", raising=False)
    with pytest.raises(InputError, match=r"pip install 'medlsam\[distributed\]'"):
        importlib.import_module("MedLSAMLib.cluster")


def test_the_old_checkpoint_option_still_works_with_a_note(tmp_path, capsys):
    """--checkpoint meant two things (MedLAM weights in localize, SAM weights in segment)."""
    from MedLSAMLib import cli

    rc = cli.main(["segment", "--template", str(tmp_path), "--image", str(tmp_path / "ct.nii.gz"), "--out",
                   str(tmp_path / "out"), "--segmenter", "sam-vit-b", "--checkpoint", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[0] == "note: --checkpoint is deprecated here; use --segmenter-checkpoint"
    rc = cli.main(["localize", "--template", str(tmp_path), "--image", str(tmp_path / "ct.nii.gz"), "--out",
                   str(tmp_path / "b.json"), "--checkpoint", "a.pt", "--medlam-checkpoint", "b.pt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["note: --checkpoint is deprecated here; use --medlam-checkpoint",
                               "medlsam: error: give --medlam-checkpoint only (--checkpoint is its deprecated name)"]


def test_a_segment_output_becomes_a_template_with_one_command(tmp_path):
    """A reviewed case is a better template: `template from-labels` takes MedLSAM's own .seg.nrrd,
    names, label values, colours and terminology from its segments, and it localizes beside others."""
    import json

    ct1, labels1 = hn_case("train-pats/pt_1")
    ct2, _ = hn_case("train-pats/pt_100")
    ct3, _ = hn_case("train-pats/pt_101")
    first = tmp_path / "pt_1"
    r = run_cli("template", "from-labels", "--image", str(ct1), "--labels", str(labels1), "--structure", "1:Brainstem",
                "--structure", "7:Mandible", "--out", str(first))
    assert r.returncode == 0, r.stderr
    r = run_cli("segment", "--template", str(first), "--image", str(ct2), "--out", str(tmp_path / "out"),
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    seg = tmp_path / "out" / "pt_100_ct.seg.nrrd"
    second = tmp_path / "pt_100"
    r = run_cli("template", "from-labels", "--image", str(ct2), "--labels", str(seg), "--out", str(second))
    assert r.returncode == 0, r.stderr
    made = json.loads((second / "template.json").read_text())
    given = json.loads((first / "template.json").read_text())
    assert [(s["name"], s["label"], s["color"], s["terminology"]) for s in made["structures"]] == \
        [(s["name"], s["label"], s["color"], s["terminology"]) for s in given["structures"]]
    assert run_cli("template", "check", str(second)).returncode == 0
    renamed = tmp_path / "renamed"
    r = run_cli("template", "from-labels", "--image", str(ct2), "--labels", str(seg), "--structure", "7:Jaw",
                "--out", str(renamed))
    assert r.returncode == 0 and [s["name"] for s in json.loads((renamed / "template.json").read_text())["structures"]] == ["Jaw"]
    r = run_cli("localize", "--template", str(first), str(second), "--image", str(ct3), "--out",
                str(tmp_path / "boxes.json"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    assert all(boxes["structures"][n]["present"] for n in ("Brainstem", "Mandible"))
