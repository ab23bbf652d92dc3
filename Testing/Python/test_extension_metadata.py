"""The Slicer build files agree with each other and with the package."""
import json
import re

from conftest import REPO

CMAKE_TO_S4EXT = {
    "EXTENSION_HOMEPAGE": "homepage",
    "EXTENSION_CATEGORY": "category",
    "EXTENSION_CONTRIBUTORS": "contributors",
    "EXTENSION_DESCRIPTION": "description",
    "EXTENSION_ICONURL": "iconurl",
    "EXTENSION_SCREENSHOTURLS": "screenshoturls",
    "EXTENSION_DEPENDS": "depends",
}


def cmake_sets(text):
    return {m.group(1): m.group(2) for m in re.finditer(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text)}


def s4ext_fields(text):
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def test_s4ext_mirrors_cmake_metadata():
    cmake_text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(MedLSAM\)", cmake_text, re.M)
    cmake = cmake_sets(cmake_text)
    s4ext = s4ext_fields((REPO / "MedLSAM.s4ext").read_text(encoding="utf-8"))
    assert set(CMAKE_TO_S4EXT) <= set(cmake)
    for key, field in CMAKE_TO_S4EXT.items():
        assert s4ext[field] == cmake[key], key
    assert cmake["EXTENSION_CATEGORY"] == "Segmentation" and "PyTorch" in cmake["EXTENSION_DEPENDS"].split()


def test_index_json_agrees():
    entry = json.loads((REPO / "MedLSAM.json").read_text(encoding="utf-8"))
    s4ext = s4ext_fields((REPO / "MedLSAM.s4ext").read_text(encoding="utf-8"))
    assert entry["category"] == s4ext["category"]
    assert entry["scm_url"] == s4ext["scmurl"]
    assert entry["build_dependencies"] == s4ext["depends"].split()


def test_module_cmake_installs_every_library_file():
    listed = set(re.findall(r"^\s+(MedLSAMLib/\S+\.py)\s*$", (REPO / "MedLSAM" / "CMakeLists.txt").read_text(encoding="utf-8"), re.M))
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "MedLSAMLib").rglob("*.py")}
    assert on_disk == listed, f"missing from MedLSAM/CMakeLists.txt: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"


def test_module_cmake_lists_every_module_file():
    """Every script and resource of the Slicer module is built and installed (nothing works only from source)."""
    text = (REPO / "MedLSAM" / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "MedLSAM")
    listed = set(re.findall(r"^\s+((?!MedLSAMLib/)[\w/.-]+\.(?:py|ui|png|txt))\s*$", text, re.M))
    module = REPO / "MedLSAM"
    on_disk = {p.relative_to(module).as_posix() for p in module.rglob("*")
               if p.suffix in (".py", ".ui", ".png", ".txt") and p.name != "CMakeLists.txt" and "Testing" not in p.parts and "__pycache__" not in p.parts}
    assert on_disk == listed, f"missing: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"


def test_mrml_layer_never_imports_qt():
    pattern = re.compile(r"^\s*(import|from)\s+(qt|ctk)\b", re.M)
    assert [p.name for p in (REPO / "MedLSAM" / "MedLSAMMRML").glob("*.py") if pattern.search(p.read_text(encoding="utf-8"))] == []


def test_core_never_imports_slicer_qt_ctk():
    pattern = re.compile(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk)\b", re.M)
    offenders = [p.name for p in (REPO / "MedLSAMLib").rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_icons_are_png():
    for path in (REPO / "Resources" / "MedLSAM.png", REPO / "MedLSAM" / "Resources" / "Icons" / "MedLSAM.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slicer_requirements_are_derived_from_pyproject():
    """One list of dependencies (pyproject.toml); the Slicer module's list is generated from it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_requirements", REPO / "scripts" / "sync_requirements.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    written = (REPO / "MedLSAM" / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    assert written == sync.slicer_requirements(), "run: python scripts/sync_requirements.py"
    assert "segment-anything>=1.0" in written and "torch" not in written.replace("torch and torchvision", "")


def test_icon_and_screenshot_urls_point_at_files_of_this_repository():
    cmake = cmake_sets((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake[key].split():
            path = re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", url)
            assert (REPO / path).is_file(), f"{key}: {url} -> {path} is not in the repository"


def test_the_slicer_floor_is_stated_once_and_agrees_with_the_python_floor():
    """Slicer 5.8 ships Python 3.9; MedLSAMLib needs pyproject's requires-python. The module's
    floor, the CMake refusal, the .s4ext note and the README name the same Slicer version."""
    import ast

    module = ast.parse((REPO / "MedLSAM" / "MedLSAM.py").read_text(encoding="utf-8"))
    constants = {t.id: ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and t.id in ("MINIMUM_PYTHON", "MINIMUM_SLICER")}
    requires = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text()).groups()
    assert constants["MINIMUM_PYTHON"] == tuple(int(v) for v in requires)
    slicer = constants["MINIMUM_SLICER"]
    assert f'set(MEDLSAM_MINIMUM_SLICER "{slicer}")' in (REPO / "CMakeLists.txt").read_text()
    assert f"Needs 3D Slicer {slicer} or newer" in (REPO / "MedLSAM.s4ext").read_text()
    assert f"3D Slicer {slicer} or newer" in (REPO / "README.md").read_text()
