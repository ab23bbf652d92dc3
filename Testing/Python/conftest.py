"""Shared fixtures. Tests that need real CT read it from ../shared/data beside the repository
(or $MEDLSAM_SHARED) and skip with a clear reason when it is absent."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from MedLSAMLib.geometry import Geometry, rotation_xyz as rotation
from MedLSAMLib.io import Volume

# Prepared templates go to a throw-away cache, never into the user's ~/.cache (subprocesses inherit it).
os.environ["MEDLSAM_CACHE"] = tempfile.mkdtemp(prefix="medlsam-test-cache-")

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDLSAM_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "MedLSAM"))  # the Slicer module's MRML layer (MedLSAMMRML) for the slicer-core tests
sys.path.insert(0, str(REPO / "MedLSAM" / "Testing" / "Python"))  # its test scenarios (not installed in Slicer)
HN = SHARED / "data" / "openkbp_hn"
SCHEMA = SHARED / "schemas" / "markups-schema-v1.0.3.json"
CORE5 = [(1, "Brainstem"), (2, "SpinalCord"), (3, "RightParotid"), (4, "LeftParotid"), (7, "Mandible")]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the repository); not present here")
    return path


@pytest.fixture(scope="session")
def hn_dir() -> Path:
    return _need(HN)


@pytest.fixture(scope="session")
def markups_schema() -> dict:
    import json

    return json.loads(_need(SCHEMA).read_text())


def hn_case(split_name: str) -> tuple[Path, Path]:
    base = _need(HN) / split_name
    return base.parent / f"{base.name}_ct.nii.gz", base.parent / f"{base.name}_label.nii.gz"


def hn_template(split_name: str, structures, out: Path) -> Path:
    """A template folder at ``out`` made from a data set case's label map (``structures``:
    (label, name) pairs)."""
    from MedLSAMLib.templates import template_from_labels

    template_from_labels(*hn_case(split_name), structures, out)
    return out


#: Direction cosines for the geometry tests: oblique, permuted-and-flipped (as the shared
#: OpenKBP files are stored), and identity.
OBLIQUE = rotation(0.3, -0.2, 0.5)
PERMUTED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


@pytest.fixture(params=["identity", "oblique", "permuted"])
def geometry(request) -> Geometry:
    direction = {"identity": np.eye(3), "oblique": OBLIQUE, "permuted": PERMUTED}[request.param]
    return Geometry(origin=[-120.5, 33.25, 810.0], spacing=[0.8, 1.1, 2.5], direction=direction, size=(40, 30, 20))


def phantom(geometry: Geometry, centre_lps, radius_mm: float, inside=300.0, outside=-1000.0) -> Volume:
    """A ball of ``inside`` HU in ``outside`` HU, sampled on ``geometry``."""
    k, j, i = np.indices(geometry.shape_kji)
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    lps = geometry.ijk_to_lps(ijk)
    d = np.linalg.norm(lps - np.asarray(centre_lps), axis=1).reshape(geometry.shape_kji)
    return Volume(np.where(d <= radius_mm, inside, outside).astype(np.float32), geometry, "phantom")


@pytest.fixture
def scene():
    """A real MRML scene (slicer-core) with the Segmentations logic registered, as the application has it."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML libraries) is not installed")
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    return scene


def _reads_shared(item) -> bool:
    """Whether a test reads the shared CT (through hn_case / hn_dir, or a module fixture that does)."""
    import inspect

    try:
        sources = [inspect.getsource(item.function)]
        for name in getattr(item, "fixturenames", ()):
            defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
            sources += [inspect.getsource(d.func) for d in defs if getattr(d, "func", None) is not None]
    except (OSError, TypeError):
        return False
    return any("hn_case(" in src or "hn_dir" in src or "HN /" in src for src in sources)


def pytest_collection_finish(session):
    """Say at the start (also under -q) what a run without ../shared leaves out."""
    items = session.items
    needing = sum(_reads_shared(item) for item in items)
    if HN.exists():
        line = f"shared CT data: {HN} ({needing} of {len(items)} tests read it)"
    else:
        line = (f"shared CT data NOT found at {HN}: {needing} of {len(items)} tests read it and will be skipped; "
                f"the other {len(items) - needing} run on data they make themselves")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
