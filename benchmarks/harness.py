"""What every benchmark shares, so that each script keeps only what is its own: the options
(``--shared``, ``--out``, ``--limit``), the head-and-neck data set and its splits, the five
structures and the protocol's support templates, the machine line, and writing the results
(``OUT.json`` + ``OUT.md``, the table printed too)."""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from MedLSAMLib.device import set_cpu_threads
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.templates import template_from_labels

CORE5 = [(1, "Brainstem"), (2, "SpinalCord"), (3, "RightParotid"), (4, "LeftParotid"), (7, "Mandible")]


def arguments(doc: str, out: str | None, limit: int | None = 0) -> argparse.ArgumentParser:
    """A parser with the shared options; ``out=None``: results are printed only; ``limit=None``:
    the benchmark has no ``--limit``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shared", default="../shared", help="the shared folder (holds data/openkbp_hn)")
    if out is not None:
        ap.add_argument("--out", default=out, help="results: OUT.json and OUT.md")
    if limit is not None:
        ap.add_argument("--limit", type=int, default=limit, help="only the first N queries (0 = all)")
    return ap


#: The query sets: the dev scans, and 30 support candidates that are neither dev scans nor the
#: protocol's templates (support_candidates_core5[5:35]), to choose settings before looking at dev.
OTHER_SCANS = slice(5, 35)


def add_scan_set_option(ap: argparse.ArgumentParser, flag: str, other: str, dev_help: str) -> None:
    """``flag`` choosing the query set: ``dev`` (described by ``dev_help``) or ``other``."""
    ap.add_argument(flag, choices=["dev", other], default="dev",
                    help=f"dev: {dev_help}; {other}: 30 support candidates that are neither dev scans nor "
                    "templates (support_candidates_core5[5:35])")


def structure_masks(labels):
    """(label, name, mask) of each CORE5 structure the label map holds."""
    for value, name in CORE5:
        truth = labels.array == value
        if truth.any():
            yield value, name, truth


def mean_max(values) -> str:
    """A table cell: "mean (max)" to one decimal."""
    return f"{np.mean(values):.1f} ({np.max(values):.1f})"


def table_head(columns: list[str]) -> list[str]:
    """The two first lines of a markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


class Bench:
    """One benchmark run: the CPU threads set, the data set found, a scratch folder."""

    def __init__(self, args, name: str):
        set_cpu_threads()
        self.args = args
        self.hn = Path(args.shared) / "data" / "openkbp_hn"
        self.splits = json.loads((self.hn / "splits.json").read_text())
        self.work = Path(tempfile.mkdtemp(prefix=f"medlsam-{name}-"))

    def dev_cases(self) -> list[str]:
        """The dev queries (``dev_eval_core5``), the first ``--limit`` of them."""
        return self.splits["dev_eval_core5"][: getattr(self.args, "limit", 0) or None]

    def other_cases(self) -> list[str]:
        """The other query set (see :data:`OTHER_SCANS`), the first ``--limit`` of them."""
        return self.splits["support_candidates_core5"][OTHER_SCANS][: getattr(self.args, "limit", 0) or None]

    def case(self, case: str):
        """(CT, label map) of a case of the data set."""
        return read_ct(self.hn / f"{case}_ct.nii.gz"), read_labels(self.hn / f"{case}_label.nii.gz")

    def shared_data(self, name: str) -> Path:
        """A data set folder under the shared folder's ``data``."""
        return Path(self.args.shared) / "data" / name

    def ct_path(self, case: str) -> Path:
        return self.hn / f"{case}_ct.nii.gz"

    def templates(self, count: int = 5, first: int = 0, folder: str = "templates") -> list[Path]:
        return support_templates(self.hn, self.splits, self.work / folder, count, first)


def support_templates(hn: Path, splits: dict, out: Path, count: int = 5, first: int = 0) -> list[Path]:
    """Template folders (CORE5 from the label maps) for ``count`` support candidates from ``first``
    (the protocol's supports are the first five)."""
    dirs = []
    for case in splits["support_candidates_core5"][first: first + count]:
        d = out / Path(case).name
        template_from_labels(hn / f"{case}_ct.nii.gz", hn / f"{case}_label.nii.gz", CORE5, d)
        dirs.append(d)
    return dirs


def points_only(template_dir: Path, out: Path) -> Path:
    """A copy of a template folder whose manifest names no label map (the image is referenced):
    what the Slicer panel saves."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((template_dir / "template.json").read_text())
    manifest.pop("labels", None)
    image = Path(manifest["image"])
    manifest["image"] = str(image if image.is_absolute() else (template_dir / image).resolve())
    for f in template_dir.glob("*.mrk.json"):
        (out / f.name).write_text(f.read_text())
    (out / "template.json").write_text(json.dumps(manifest, indent=1))
    return out


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_results(out: str | Path, data: dict, markdown: str | list[str] | None = None) -> Path:
    """``OUT.json`` (and ``OUT.md`` with the table, text or lines, which is printed too)."""
    out = Path(out)
    if isinstance(markdown, list):
        markdown = "\n".join(markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float))
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n")
        print(markdown)
    return out
