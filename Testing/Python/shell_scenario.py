"""Run by test_slicer_shell.py in its own process: imports the Slicer shell files (MedLSAM.py and the
Segment Editor effect) against strict fakes + real slicer-core MRML, exercises what runs without Qt
widgets, and prints what it observed as JSON."""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO / "MedLSAM"), str(HERE)]

import slicer  # noqa: E402  (real slicer-core)

import slicer_shell_fakes as fakes  # noqa: E402

manifest = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
members = manifest["segment_editor_effect"]["scriptedEffect_callable_members"]["qSlicerSegmentEditorScriptedEffect"]
scene = slicer.vtkMRMLScene()
slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
recorders = fakes.install(scene, [m for m in members if m != "note"])
out = {}

import MedLSAM  # noqa: E402  (the shell module, file scope runs here)

parent = fakes.ModuleParent()
MedLSAM.MedLSAM(parent)
out["parent"] = {k: parent._values[k] for k in ("title", "categories", "dependencies", "contributors")}
out["startup_connections"] = [(sig, slot.__name__) for sig, slot in recorders["app"].connections]

MedLSAM.registerEditorEffect()
adaptor = recorders["factory"][0]
effect = adaptor.self()
effect.setMRMLDefaults()
out["effect"] = {"name": adaptor.name, "perSegment": adaptor.perSegment, "requireSegments": adaptor.requireSegments,
                 "help_mentions_apply": "Apply" in effect.helpText(), "defaults": adaptor.defaults,
                 "icon_exists": Path(effect.icon().path).is_file(), "clone_source": Path(effect.clone().source).name}

logic = MedLSAM.MedLSAMLogic()
p = logic.getParameterNode()
out["defaults"] = {"localizer": p.localizer, "mode": p.mode, "segmenter": p.segmenter, "device": p.device}
p.mode = "wpl"
out["mode_persisted"] = logic.getParameterNode().mode
try:
    p.mode = "xyz"
except ValueError as exc:
    out["bad_mode"] = str(exc)
# the effect localizes and segments with the panel's localizer, segmenter and device (one configuration)
import typing  # noqa: E402

out["localizer_choices"] = typing.get_type_hints(MedLSAM.MedLSAMParameterNode, include_extras=True)[
    "localizer"].__metadata__[0].choices
p.device = "cpu"
spec, device = effect._panelSegmenter()
out["effect_segmenter"] = [[spec.name, spec.checkpoint, device]]
p.segmenter, p.segmenterCheckpoint = "sam-vit-b", Path("/weights/sam_vit_b.pth")
spec, device = effect._panelSegmenter()
out["effect_segmenter"].append([spec.name, spec.checkpoint, device])
p.localizer, p.mode = "registration", "spl"
localizer = effect.panelSettings(("/templates/a",)).localizer
out["effect_localizer"] = [localizer.kind, localizer.mode, localizer.device]
p.segmenter, p.device, p.localizer, p.mode = "litemedsam", "auto", "auto", "wpl"
volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "template ct")
p.templateVolume = volume
out["template_volumes"] = [n.GetName() for n in logic.templateVolumeNodes()]

node = logic.addStructure("Brainstem", 1)
logic.addStructure("Mandible", 7)
out["structures"] = [n.GetName() for n in logic.structureNodes()]
out["progress"] = logic.placementStatus(node).progress
out["next_point"] = logic.placementStatus(node).next_point
for bad in (("Brainstem", 2), ("", 3)):
    try:
        logic.addStructure(*bad)
    except ValueError as exc:
        out.setdefault("add_errors", []).append(str(exc))
try:
    logic.startCohort([], logic.runSettings(["t"]))
except ValueError as exc:
    out["empty_cohort"] = str(exc)
# Reload and Test: Slicer calls runTest with no unittest runner, so a skip must not escape it
import unittest  # noqa: E402

selfTest = MedLSAM.MedLSAMTest()
ran = []


def _skip():
    raise unittest.SkipTest("not a source checkout")


selfTest.test_library_importable = lambda: ran.append("library")
selfTest.test_widget_builds_and_binds_parameters = lambda: ran.append("widget")
selfTest.test_template_placement_and_cohort = _skip
selfTest.runTest()
out["self_test"] = {"ran": ran, "displayed": list(fakes.DISPLAYED)}
# a Slicer whose Python is too old gets one clear sentence, and nothing is installed
MedLSAM.MINIMUM_PYTHON = (99, 0)
try:
    logic.installDependencies(askConfirmation=False)
except RuntimeError as exc:
    out["old_python"] = str(exc)
MedLSAM.MINIMUM_PYTHON = (3, 10)
out["packaging"] = repr(MedLSAM.slicerPackaging())
# the README's console example, as written (template paths swapped for a real template when the
# shared CT is there): it must run and give one result per volume, here a failed case for an
# empty volume, not a TypeError
import re  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402

readme = (REPO / "README.md").read_text(encoding="utf-8")
example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "processCohort" in b)
shared_ct = REPO.parent / "shared" / "data" / "openkbp_hn" / "train-pats"
if (shared_ct / "pt_1_ct.nii.gz").is_file():
    from MedLSAMLib.templates import template_from_labels

    folder = Path(tempfile.mkdtemp()) / "pt_1"
    template_from_labels(shared_ct / "pt_1_ct.nii.gz", shared_ct / "pt_1_label.nii.gz", [(1, "Brainstem")], folder)
    example = re.sub(r'"/path/to/templates/pt_\d"', repr(str(folder)), example)
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")  # the self-test's setUp cleared the scene
    console = {"slicer": types.SimpleNamespace(util=types.SimpleNamespace(
        getModuleLogic=lambda name: logic if name == "MedLSAM" else None, getNodesByClass=slicer.util.getNodesByClass))}
    exec(compile(example, "README.md", "exec"), console)
    out["readme_example"] = [[r.volume, r.status] for r in console["results"]]
out["requirements"] = logic.requirements()
out["missing"] = logic.missingPackages()
print("RESULT " + json.dumps(out))
