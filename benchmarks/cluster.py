"""Cases per hour: the local executor vs a Dask LocalCluster on the same machine.

Same cases (held-out head-and-neck CTs), same 5 templates, LiteMedSAM, CPU. The local executor
uses every core in one process; the cluster runs N worker processes with cores/N threads each.
Wall times include loading models and computing template support features (per batch for the
local executor; once on the client plus once per worker for the cluster). Per-case stage
times come from the cases' JSON records and feed the estimate for N workers.

    python benchmarks/cluster.py --shared ../shared --cases 4 --workers 2 --out docs/bench/cluster
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from MedLSAMLib.cluster import run_cohort_dask
from MedLSAMLib.settings import RunSettings
from MedLSAMLib.localizers import KINDS, LocalizerSpec
from MedLSAMLib.device import usable_cores
from MedLSAMLib.pipeline import run_cohort

from harness import Bench, arguments, write_results  # benchmarks/ is on sys.path when run as a script



def stage_times(out_dir: Path, cases) -> dict:
    rows = [json.loads((out_dir / f"{c}.json").read_text())["timing_s"] for c in cases]
    return {k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in ("localize", "encode", "decode", "postprocess", "total")}


def main():
    ap = arguments(__doc__, "docs/bench/cluster", limit=None)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--localizer", choices=KINDS, default="auto")
    args = ap.parse_args()
    bench = Bench(args, "clusterbench")
    work = bench.work
    tdirs = [str(d) for d in bench.templates()]
    images = [bench.ct_path(c) for c in bench.splits["dev_eval_core5"][: args.cases]]
    names = [p.name[: -len(".nii.gz")] for p in images]
    settings = RunSettings(tuple(tdirs), LocalizerSpec(args.localizer, "wpl", device="cpu"))

    t0 = time.perf_counter()
    cohort = settings.build()
    setup_local = time.perf_counter() - t0
    local = run_cohort(cohort, images, work / "local", show_progress=False)
    wall_local = time.perf_counter() - t0
    assert local.counts["ok"] == len(images), local.counts
    del cohort

    t0 = time.perf_counter()
    dask_summary = run_cohort_dask(settings, images, work / "dask", workers=args.workers, show_progress=False)
    wall_dask = time.perf_counter() - t0
    assert dask_summary.counts["ok"] == len(images), dask_summary.counts

    cores = usable_cores()
    st_local, st_dask = stage_times(work / "local", names), stage_times(work / "dask", names)
    result = {"cases": len(images), "cores": cores, "workers": args.workers,
              "local": {"wall_s": wall_local, "setup_s": setup_local, "stages_s": st_local,
                        "cases_per_hour": 3600 * len(images) / wall_local},
              "dask": {"wall_s": wall_dask, "stages_s": st_dask, "cases_per_hour": 3600 * len(images) / wall_dask}}
    lines = [f"| executor | wall (s) for {len(images)} cases | cases per hour | mean per-case seconds: localize / encode / decode / total |",
             "|---|---|---|---|"]
    for key, label in (("local", f"local (1 process, {cores} threads)"),
                       ("dask", f"Dask LocalCluster ({args.workers} workers x {max(1, cores // args.workers)} thread)")):
        r = result[key]
        s = r["stages_s"]
        lines.append(f"| {label} | {r['wall_s']:.0f} | {r['cases_per_hour']:.1f} | "
                     f"{s['localize']:.1f} / {s['encode']:.1f} / {s['decode']:.1f} / {s['total']:.1f} |")
    lines += ["", f"Local model loading + support features for 5 templates: {setup_local:.1f} s."]
    write_results(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
