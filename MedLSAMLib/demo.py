"""``medlsam demo``: the whole template -> cohort workflow, offline, on real patients.

Three head-and-neck patients serve as templates holding only the six extreme points of each of
five structures (what a clinician clicks in the Slicer panel); three other patients form the
cohort. The default localizer finds the structures in each cohort scan, the default segmentation
makes the masks (each template's mask made from its six points, carried onto the scan), and they
are scored against the cohort's clinical contours. The data (six OpenKBP training patients,
MIT licence: ``data/demo/NOTICE.md``) ships inside the package; nothing is downloaded.

Three templates and three scans show the workflow and its typical accuracy on new patients;
the benchmark on 16 held-out scans with five templates is in docs/results.md.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from .errors import InputError
from .io import write_text_atomic

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo"


def demo_data(folder: Path = DEMO_DATA) -> dict:
    """The shipped demo files, checked against their SHA256SUMS: {"templates": [...], "cohort": [...],
    "labels": folder}. A changed or missing file is a one-line error."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise InputError(f"the demo data is missing from {folder} (reinstall medlsam)")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise InputError(f"demo file {path} is missing or changed (reinstall medlsam)")
    return {"templates": sorted(p for p in (folder / "templates").iterdir() if (p / "template.json").is_file()),
            "cohort": sorted((folder / "cohort").glob("*.nii.gz")), "labels": folder / "cohort_labels"}


def run_demo(out_dir: Path, cases: int = 3, device: str = "auto", log=print, localizer_kind: str = "auto") -> dict:
    """Six-point templates of three patients -> ``segment`` the other patients -> ``evaluate``
    against their clinical contours; returns the evaluation summary (also in demo_summary.json)."""
    from .device import set_cpu_threads
    from .evaluate import evaluate, summarize
    from .localizers import LocalizerSpec
    from .pipeline import run_cohort
    from .settings import RunSettings

    set_cpu_threads()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data = demo_data()
    if not 1 <= cases <= len(data["cohort"]):
        raise InputError(f"--cases must be 1-{len(data['cohort'])} (the demo ships {len(data['cohort'])} cohort scans)")
    templates = []
    for folder in data["templates"]:  # a copy the user can open and edit
        target = out_dir / "templates" / folder.name
        shutil.copytree(folder, target, dirs_exist_ok=True)
        templates.append(target)
    names = json.loads((templates[0] / "template.json").read_text())["structures"]
    log(f"templates: {', '.join(t.name for t in templates)} (six points per structure, no masks: "
        f"{', '.join(s['name'] for s in names)}) -> {out_dir / 'templates'}")
    images = data["cohort"][:cases]
    log(f"cohort: {', '.join(p.name.split('.')[0] for p in images)} (other patients; clinical contours for scoring)")

    settings = RunSettings(tuple(str(t) for t in templates), LocalizerSpec(localizer_kind, device=device))
    batch = run_cohort(settings.build(), images, out_dir / "results")
    rows = evaluate(out_dir / "results", data["labels"])
    summary = {"templates": [t.name for t in templates], "cases": [p.name.split(".")[0] for p in images],
               "batch": batch.counts, "metrics": summarize(rows), "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(out_dir / "demo_summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    return summary
