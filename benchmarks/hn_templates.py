"""What the head-and-neck benchmarks share: the five structures and the five support templates."""
from __future__ import annotations

from pathlib import Path

from MedLSAMLib.templates import template_from_labels

CORE5 = [(1, "Brainstem"), (2, "SpinalCord"), (3, "RightParotid"), (4, "LeftParotid"), (7, "Mandible")]


def support_templates(hn: Path, splits: dict, out: Path, count: int = 5, first: int = 0) -> list[Path]:
    """Template folders (CORE5 from the label maps) for ``count`` support candidates from ``first``
    (the protocol's supports are the first five)."""
    dirs = []
    for case in splits["support_candidates_core5"][first: first + count]:
        d = out / Path(case).name
        template_from_labels(hn / f"{case}_ct.nii.gz", hn / f"{case}_label.nii.gz", CORE5, d)
        dirs.append(d)
    return dirs
