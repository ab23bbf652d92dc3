"""Static checks of the Slicer-only layer (the Qt shell that cannot run outside 3D Slicer).

Static/fake-based, not Slicer self-tests. Names are checked against the Slicer API manifest in
../shared/slicer-api/ (extracted from Slicer v5.10.0 / v5.12.3 and CTK headers): the .ui widgets and
their properties, every ``self.ui.<widget>.<member>``, the parameter-node bindings, every
``slicer.util`` call (name and argument count), every ``scriptedEffect`` member, the hooks an effect
defines and the module's ``parent`` attributes.
"""
import ast
import json
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO, SHARED

MODULE = REPO / "MedLSAM" / "MedLSAM.py"
EFFECT = REPO / "MedLSAM" / "SegmentEditorMedLSAMLib" / "SegmentEditorEffect.py"
UI = REPO / "MedLSAM" / "Resources" / "UI" / "MedLSAM.ui"
MANIFEST = SHARED / "slicer-api" / "slicer-api.json"

# Plain Qt classes the .ui may use (PythonQt exposes them; they are not in Slicer's manifest)
QT_WIDGETS = {"QWidget", "QLabel", "QPushButton", "QLineEdit", "QSpinBox", "QComboBox", "QTableWidget",
              "QListWidget", "QRadioButton", "QProgressBar", "QCheckBox"}
# Layouts and spacers in the .ui
QT_LAYOUT_TAGS = {"QFormLayout", "QHBoxLayout", "QVBoxLayout", "QGridLayout"}


@pytest.fixture(scope="module")
def api():
    if not MANIFEST.is_file():
        pytest.skip(f"Slicer API manifest not found at {MANIFEST} (it ships in ../shared/slicer-api)")
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ui_widgets():
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _tree(path):
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _attr_chain(node):
    """['self', 'ui', 'applyButton', 'enabled'] for self.ui.applyButton.enabled."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return []


def _widget_members(api, cls):
    """Every property, signal, slot, invokable and enum value reachable from a Slicer/CTK class,
    or None when the chain reaches an external Qt class (then any member is allowed)."""
    widgets, bases = api["designer_widgets"]["widgets"], api["designer_widgets"]["base_classes"]
    members = set()
    entry = widgets.get(cls) or bases.get(cls)
    if entry is None:
        return None
    for name in entry.get("base_chain", [cls]):
        name = name.replace(" (external)", "")
        info = widgets.get(name) or bases.get(name)
        if info is None:  # an external Qt base (QWidget, QAbstractButton ...): its members are Qt's
            return members | {"<external>"}
        for key in ("properties", "signals", "slots", "invokables"):
            value = info.get(key) or {}
            members |= set(value if isinstance(value, dict) else [v if isinstance(v, str) else v.get("name") for v in value])
        for enum in (info.get("enums") or {}).values():
            members |= set(enum.get("values", []) if isinstance(enum, dict) else [])
    return members


def test_every_ui_widget_class_exists_in_slicer_or_qt(api, ui_widgets):
    designer = set(api["designer_widgets"]["widgets"])
    unknown = {name: w.get("class") for name, w in ui_widgets.items()
               if w.get("class") not in designer and w.get("class") not in QT_WIDGETS}
    assert unknown == {}
    layouts = {lay.get("class") for lay in ET.parse(UI).getroot().iter("layout")}
    assert layouts <= QT_LAYOUT_TAGS


def test_ui_properties_of_slicer_widgets_exist(api, ui_widgets):
    problems = []
    for name, w in ui_widgets.items():
        members = _widget_members(api, w.get("class"))
        if members is None or "<external>" in members and not members - {"<external>"}:
            continue
        for prop in w.findall("property"):
            if prop.get("stdset") == "0":
                continue  # dynamic property (SlicerParameterName)
            pname = prop.get("name")
            generic_qt = {"enabled", "visible", "toolTip", "text", "checked", "collapsed", "wordWrap"}
            if pname not in members and pname not in generic_qt:
                problems.append(f"{name} ({w.get('class')}).{pname}")
    assert problems == []


def test_every_self_ui_name_exists_in_the_ui_file(ui_widgets):
    used = set()
    for node in ast.walk(_tree(MODULE)):
        chain = _attr_chain(node) if isinstance(node, ast.Attribute) else []
        if chain[:2] == ["self", "ui"] and len(chain) >= 3:
            used.add(chain[2])
    assert used, "the widget uses self.ui"
    assert sorted(used - set(ui_widgets)) == []


def test_self_ui_members_exist_on_slicer_widget_classes(api, ui_widgets):
    problems = []
    for node in ast.walk(_tree(MODULE)):
        chain = _attr_chain(node) if isinstance(node, ast.Attribute) else []
        if chain[:2] != ["self", "ui"] or len(chain) < 4:
            continue
        widget, member = chain[2], chain[3]
        members = _widget_members(api, ui_widgets[widget].get("class"))
        if members is None or member in members or "<external>" in members and member in _QT_MEMBERS:
            continue
        problems.append(f"self.ui.{widget}.{member} ({ui_widgets[widget].get('class')})")
    assert problems == []


# Qt members used on Slicer widgets that come from their Qt base classes (QWidget / QAbstractButton)
_QT_MEMBERS = {"enabled", "visible", "toolTip", "connect", "setStyleSheet", "text", "checked", "blockSignals"}


def test_string_connects_name_real_signals(api, ui_widgets):
    """``self.ui.W.connect("signal(args)", slot)``: for Slicer/CTK widgets the signal must exist."""
    problems = []
    for node in ast.walk(_tree(MODULE)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        chain = _attr_chain(node.func.value)
        if chain[:2] != ["self", "ui"] or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        cls = ui_widgets[chain[2]].get("class")
        signal = node.args[0].value.split("(")[0]
        members = _widget_members(api, cls)
        if members is not None and signal not in members and cls not in QT_WIDGETS:
            problems.append(f"{chain[2]} ({cls}): {signal}")
    assert problems == []


def _parameter_fields():
    for node in ast.walk(_tree(MODULE)):
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class")


def test_parameter_bindings_match_fields_and_connectors(api, ui_widgets):
    fields = _parameter_fields()
    connectors = api["parameter_node_wrapper"]["gui_connectors"]

    def datatype(annotation):
        if "vtkMRML" in annotation:
            return "vtkMRMLNode subclass or Union of node classes"
        if "pathlib.Path" in annotation:
            return "pathlib.Path"
        return re.sub(r"Annotated\[(\w+),.*", r"\1", annotation)

    bound = {}
    for name, w in ui_widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, w.get("class"))
    assert set(bound) == set(fields), "every parameter is shown in the panel and every binding has a parameter"
    for param, (widget, cls) in bound.items():
        dtype = datatype(fields[param])
        ok = [c for c in connectors.values()
              if any(wc.split(".")[-1] == cls for wc in c["widget_classes"]) and dtype in c["datatypes"]]
        assert ok, f"{widget} ({cls}) cannot show a {dtype} parameter ({param})"


def test_parameter_wrapper_imports_exist(api):
    exported = set(api["parameter_node_wrapper"]["package_exports"])
    for node in ast.walk(_tree(MODULE)):
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.parameterNodeWrapper":
            assert {a.name for a in node.names} <= exported


def _slicer_util_calls(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            chain = _attr_chain(node.func)
            if chain[:2] == ["slicer", "util"] and len(chain) == 3:
                yield chain[2], len(node.args) + len(node.keywords), node.lineno


@pytest.mark.parametrize("path", [MODULE, EFFECT], ids=["module", "effect"])
def test_slicer_util_calls_exist_with_valid_argument_counts(api, path):
    util = api["slicer_util"]
    problems = []
    calls = list(_slicer_util_calls(path))
    assert calls
    for name, nargs, line in calls:
        entry = util["functions"].get(name) or util["classes"].get(name)
        if entry is None:
            problems.append(f"{path.name}:{line}: slicer.util.{name} does not exist")
            continue
        lo, hi = entry.get("nargs", [0, None])
        if nargs < lo or (hi is not None and nargs > hi):
            problems.append(f"{path.name}:{line}: slicer.util.{name} takes {lo}..{hi} arguments, given {nargs}")
        if entry.get("tags") and "v5.10.0" not in entry["tags"]:
            problems.append(f"{path.name}:{line}: slicer.util.{name} is not in Slicer 5.10")
    assert problems == []


def test_scripted_effect_members_and_hooks_exist(api):
    members = api["segment_editor_effect"]["scriptedEffect_callable_members"]["qSlicerSegmentEditorScriptedEffect"]
    hooks = set(api["segment_editor_effect"]["python_hooks_called_by_cpp"]["qSlicerSegmentEditorScriptedEffect"]["methods"])
    used = set()
    tree = _tree(EFFECT)
    for node in ast.walk(tree):
        chain = _attr_chain(node) if isinstance(node, ast.Attribute) else []
        if chain[:2] == ["self", "scriptedEffect"] and len(chain) >= 3:
            used.add(chain[2])
        if chain[:1] == ["scriptedEffect"] and len(chain) >= 2:
            used.add(chain[1])
    assert used and sorted(used - set(members)) == []
    effect_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
    defined = {f.name for f in effect_class.body if isinstance(f, ast.FunctionDef)}
    required = {"clone", "icon", "helpText", "setupOptionsFrame", "setMRMLDefaults", "updateGUIFromMRML",
                "updateMRMLFromGUI", "deactivate", "cleanup"}
    assert required <= defined and required <= hooks
    # deprecated name guard: Slicer renamed "master" to "source" volume
    assert "masterVolumeImageData" not in EFFECT.read_text(encoding="utf-8")
    abstract = api["segment_editor_effect"]["python_abstract_classes"]["AbstractScriptedSegmentEditorEffect"]
    assert abstract["methods"]["__init__"]["nargs"] == [1, 1]


def test_module_parent_attributes_are_writable(api):
    check = api["scripted_loadable_module"]["module_parent_attribute_check"]
    writable = {name for name, info in check["attributes"].items() if info.get("writable")}
    assigned = set()
    for node in ast.walk(_tree(MODULE)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                chain = _attr_chain(target) if isinstance(target, ast.Attribute) else []
                if chain[:2] == ["self", "parent"] and len(chain) == 3:
                    assigned.add(chain[2])
    assert {"title", "categories", "helpText"} <= assigned
    assert sorted(assigned - writable) == []


def test_gui_only_slicer_names_are_known(api):
    """``slicer.X`` names that slicer-core lacks must be GUI names Slicer really has."""
    slicer = pytest.importorskip("slicer", reason="slicer-core not installed")
    gui_only = {"app", "modules", "mrmlScene", "util", "i18n", "packaging", "parameterNodeWrapper",
                "ScriptedLoadableModule", "qSlicerSegmentEditorAbstractEffect", "vtkMRMLScalarVolumeNode"}
    used = set()
    for path in (MODULE, EFFECT):
        for node in ast.walk(_tree(path)):
            chain = _attr_chain(node) if isinstance(node, ast.Attribute) else []
            if chain[:1] == ["slicer"] and len(chain) >= 2:
                used.add(chain[1])
    missing = {n for n in used if not hasattr(slicer, n) and n not in gui_only}
    assert missing == set()
    assert "qSlicerSegmentEditorAbstractEffect" in api["segment_editor_effect"]["cpp_classes"]
