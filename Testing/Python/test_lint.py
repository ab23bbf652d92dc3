"""pyflakes over every Python file we ship or test with: unused imports, undefined names, dead locals."""
import pytest

from conftest import REPO


def test_pyflakes_finds_nothing():
    api = pytest.importorskip("pyflakes.api", reason="pyflakes not installed (pip install '.[test]')")
    from pyflakes.reporter import Reporter
    import io

    out, err = io.StringIO(), io.StringIO()
    paths = [p for d in ("MedLSAMLib", "MedLSAM", "Testing", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py")]
    assert paths
    count = sum(api.checkPath(str(p), Reporter(out, err)) for p in paths)
    assert count == 0, out.getvalue() + err.getvalue()
