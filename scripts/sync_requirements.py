"""Write MedLSAM/Resources/requirements.txt (what the Slicer module installs into Slicer's Python)
from pyproject.toml, the one list of dependencies. Run after changing pyproject's dependencies;
Testing/Python/test_extension_metadata.py fails while the two disagree."""
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "MedLSAM" / "Resources" / "requirements.txt"
# Slicer ships these itself; torch and torchvision come from the PyTorch extension (PyTorchUtils).
PROVIDED_BY_SLICER = {"numpy", "SimpleITK", "matplotlib", "torch", "torchvision"}
HEADER = ("# Python packages the MedLSAM module installs into Slicer's Python (after the user confirms).\n"
          "# Derived from pyproject.toml by scripts/sync_requirements.py; do not edit by hand.\n"
          "# torch and torchvision come from the PyTorch extension (PyTorchUtils), never from this list.\n")


def slicer_requirements() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    name = lambda spec: spec.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()  # noqa: E731
    return HEADER + "".join(f"{d}\n" for d in deps if name(d) not in PROVIDED_BY_SLICER)


if __name__ == "__main__":
    TARGET.write_text(slicer_requirements(), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(REPO)}", file=sys.stderr)
