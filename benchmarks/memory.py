"""Peak memory of one large case: a 512 x 512 x 600 CT through localize + segment + write.

The CT is a held-out head-and-neck scan resampled to 512 x 512 x 600 (about 1 x 1 x 0.53 mm),
so the anatomy is real and the array is the size the issue asks about. The run is the product's
default path (``RunSettings``: the default localizer and segmentation options, LiteMedSAM);
``--prior-weight`` below 1 makes SAM encode slices too. Peak RSS is the process's maximum
resident set size (``ru_maxrss``), which includes torch and both models.

    python benchmarks/memory.py --shared ../shared --structures Brainstem Mandible
"""
from __future__ import annotations

import resource
import time

import numpy as np

from MedLSAMLib.geometry import Geometry
from MedLSAMLib.io import read_ct, read_labels, write_segmentation, write_volume
from MedLSAMLib.localizers import LocalizerSpec
from MedLSAMLib.preprocess import resample
from MedLSAMLib.segment.slices import SegmentOptions
from MedLSAMLib.settings import RunSettings
from MedLSAMLib.templates import Structure, default_color, template_from_labels

from harness import CORE5, Bench, arguments  # benchmarks/ is on sys.path when run as a script


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = arguments(__doc__, None, limit=None)
    ap.add_argument("--case", default="validation-pats/pt_201")
    ap.add_argument("--structures", nargs="+", default=[n for _, n in CORE5])
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 600])
    ap.add_argument("--prior-weight", type=float, default=SegmentOptions.prior_weight,
                    help="SegmentOptions.prior_weight (default: the product's; below 1 SAM encodes slices)")
    ap.add_argument("--write-only", action="store_true",
                    help="measure only the output stage (.seg.nrrd + label map) with the case's reference labels")
    bench = Bench(ap.parse_args(), "mem")
    args, hn, work = bench.args, bench.hn, bench.work
    wanted = [(v, n) for v, n in CORE5 if n in args.structures]
    template_from_labels(bench.ct_path("train-pats/pt_1"), hn / "train-pats/pt_1_label.nii.gz", wanted, work / "t")
    small = read_ct(bench.ct_path(args.case))
    g = small.geometry
    extent = g.spacing * (np.asarray(g.size) - 1)
    size = np.asarray(args.size)
    big_geom = Geometry(g.origin, extent / (size - 1), g.direction, tuple(size))
    big = resample(small, big_geom, linear=True)
    big.array = big.array.astype(np.float32)
    print(f"CT {big.geometry.size}, spacing {np.round(big.geometry.spacing, 3).tolist()}, "
          f"{big.array.nbytes / 2**20:.0f} MB as float32; RSS so far {rss_mb():.0f} MB", flush=True)
    if args.write_only:
        labels = resample(read_labels(hn / f"{args.case}_label.nii.gz"), big_geom, linear=False, default=0).array
        structures = [Structure(n, v, np.array([[0.0, 0, 0]] * 6), default_color(v)) for v, n in wanted]
        t0 = time.perf_counter()
    else:
        settings = RunSettings((str(work / "t"),), LocalizerSpec(device="cpu", cache_dir=None),
                               options=SegmentOptions(prior_weight=args.prior_weight))
        cohort = settings.build()
        print(f"{cohort.localizer.kind} localizer and {cohort.segmenter.describe()['name']} ready; "
              f"peak RSS {rss_mb():.0f} MB", flush=True)
        structures = list(cohort.structures.values())
        t0 = time.perf_counter()
        labels, record = cohort.segment_volume(big)
        t = record.timing_s
        print(f"structures {args.structures}: localize {t['localize']:.0f} s, {t['slices']} slice(s) encoded, "
              f"{t.get('interpolated_slices', 0)} interpolated, total {time.perf_counter() - t0:.0f} s; "
              f"peak RSS {rss_mb():.0f} MB", flush=True)
    # the output stage of `medlsam segment` (pipeline.CohortSegmenter.segment_case)
    label_volume = big.with_array(labels.astype(np.uint8))
    write_volume(label_volume, work / "case_labels.nii.gz")
    write_segmentation(label_volume, [{"name": s.name, "label": s.label, "color": s.color} for s in structures],
                       work / "case.seg.nrrd")
    print(f"outputs written ({time.perf_counter() - t0:.0f} s so far); peak RSS {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
