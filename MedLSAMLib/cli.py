"""The ``medlsam`` command line.

User errors (bad files, inconsistent templates, ...) print one line on stderr and exit 2.
Heavy imports (torch) happen inside the subcommands that need them, so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import USER_ERRORS, InputError
from .segment import RUNTIMES, SEGMENTERS

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit 2) instead of printing usage."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _add_template_commands(sub) -> None:
    p = sub.add_parser("template", help="create or check templates (six extreme points per structure)")
    tsub = p.add_subparsers(dest="template_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    fl = tsub.add_parser(
        "from-labels",
        help="derive a template from a CT and its label map (no clicking needed)",
        description="Write DIR/template.json and one Slicer markups file per structure, with the six "
        "extreme points taken from the label map.",
    )
    fl.add_argument("--image", required=True, help="template CT (NIfTI, NRRD, MHA or DICOM folder)")
    fl.add_argument("--labels", required=True, help="label map on the same grid as --image, or a Slicer .seg.nrrd "
                    "(e.g. a medlsam segment output, reviewed): its segments name the structures")
    fl.add_argument("--structure", action="append", default=[], metavar="LABEL:NAME",
                    help="structure to take, e.g. 1:Brainstem (repeat for several; with a .seg.nrrd or "
                    "--color-table: optional, selects and renames)")
    fl.add_argument("--color-table", metavar="FILE",
                    help="the label map's colour table (Slicer .ctbl/.txt, or ITK-SNAP label descriptions): "
                    "names and colours of its labels; every label in the map that it names is taken")
    fl.add_argument("--out", required=True, help="output template folder")
    fl.set_defaults(func=_cmd_template_from_labels)

    chk = tsub.add_parser("check", help="validate a template folder against its CT and print a summary")
    chk.add_argument("template", help="template folder")
    chk.set_defaults(func=_cmd_template_check)


def _cmd_template_from_labels(args) -> int:
    from .templates import parse_structure_spec, template_from_labels

    specs = [parse_structure_spec(s) for s in args.structure]
    template = template_from_labels(args.image, args.labels, specs, args.out, color_table=args.color_table)
    print(f"wrote template with {len(template.structures)} structure(s) to {args.out}")
    for s in template.structures.values():
        print(f"  {s.label:>3}  {s.name}")
    return 0


def _cmd_template_check(args) -> int:
    from .geometry import box_from_extreme_points
    from .templates import load_template

    template = load_template(args.template)
    image = template.load_image()
    print(f"template {template.name}: image {template.image_path} size {image.geometry.size} "
          f"spacing {[round(float(s), 3) for s in image.geometry.spacing]}")
    for s in template.structures.values():
        extent = box_from_extreme_points(s.points)
        size = extent[1] - extent[0]
        print(f"  {s.label:>3}  {s.name:<20} extent (x, y, z) mm: {size[0]:.1f} x {size[1]:.1f} x {size[2]:.1f}")
    print("ok")
    return 0


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="self-supervised training of the MedLAM localizer",
                       description="Train MedLAM (UAM + MSS) on unlabeled CTs. Writes OUT/medlam.pt (weights), "
                       "OUT/last.pt (resumable state), OUT/loss.csv and OUT/loss.png.")
    p.add_argument("--images", required=True, help="folder of CTs, or a text file with one CT path per line")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--config", choices=["lite", "reference"], default="lite",
                   help="network size: lite (CPU-trainable, default) or reference (the paper's)")
    p.add_argument("--steps", type=int, default=2000, help="total optimisation steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=2, help="patch pairs per step (default 2)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="save state this often (default 5)")
    _add_device_option(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from pathlib import Path

    from .medlam.training import Trainer, TrainOptions, list_images

    opts = TrainOptions(config=args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, checkpoint_minutes=args.checkpoint_minutes, device=args.device)
    trainer = Trainer(list_images(args.images), Path(args.out), opts, log=lambda m: print(m, file=sys.stderr))
    weights = trainer.run(resume=args.resume)
    print(f"trained {trainer.step} steps; weights: {weights}; curves: {Path(args.out) / 'loss.png'}")
    return 0


def _add_device_option(p, deprecated_checkpoint: bool = False) -> None:
    """--device; with ``deprecated_checkpoint`` also the hidden old ``--checkpoint`` (see
    :func:`_start_heavy_command`)."""
    from .device import DEVICES

    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto (default): a CUDA GPU when there is one, else the CPU with all usable cores")
    if deprecated_checkpoint:
        p.add_argument("--checkpoint", dest="old_checkpoint", help=argparse.SUPPRESS)


def _add_localizer_options(p) -> None:
    """The localizer choice, shared by localize and segment (one definition, one set of names and
    defaults: those of LocalizerSpec)."""
    from .localizers import KINDS, LocalizerSpec

    default_mode = LocalizerSpec.mode

    p.add_argument("--localizer", choices=KINDS, default="auto",
                   help="auto (default): the most accurate on our benchmark (hybrid), or medlam when "
                   "--medlam-checkpoint is given; hybrid: template alignment, coarse to fine; medlam: the MedLAM "
                   "network; registration: plain affine atlas (reference)")
    p.add_argument("--mode", choices=["wpl", "spl"], default=default_mode,
                   help="wpl: one box per structure; spl: one box per 6 mm sub-part (needs template label maps, "
                   f"else wpl). Default {default_mode}")
    p.add_argument("--medlam-checkpoint", help="MedLAM weights for --localizer medlam (default: the shipped "
                   "head-and-neck checkpoint; the authors' medlam.pth works too)")
    p.add_argument("--template-cache", metavar="DIR",
                   help="where prepared templates are cached (default $MEDLSAM_CACHE or ~/.cache/medlsam; "
                   "'none' to disable)")


def _start_heavy_command(args, new_name: str, dest: str) -> None:
    """Before localize or segment: the CPU thread count, and the deprecated ``--checkpoint``
    (it meant the MedLAM weights in localize and the SAM weights in segment; it still works,
    with a note naming the unambiguous option)."""
    from .device import set_cpu_threads

    set_cpu_threads()
    if getattr(args, "old_checkpoint", None):
        print(f"note: --checkpoint is deprecated here; use {new_name}", file=sys.stderr)
        if getattr(args, dest):
            raise InputError(f"give {new_name} only (--checkpoint is its deprecated name)")
        setattr(args, dest, args.old_checkpoint)


def _localizer_spec(args):
    from .localizers import LocalizerSpec

    cache = "" if args.template_cache is None else (None if args.template_cache == "none" else args.template_cache)
    return LocalizerSpec(args.localizer, args.mode, args.medlam_checkpoint, args.device, cache)


def _add_template_option(p) -> None:
    p.add_argument("--template", nargs="+", required=True, metavar="DIR", help="template folder(s)")


def _add_localize_command(sub) -> None:
    p = sub.add_parser("localize", help="find template structures in a CT (3D boxes)",
                       description="Localize every template structure in QUERY and write boxes.json: per structure "
                       "presence, confidence, box in voxel indices (inclusive, i fastest) and LPS mm, sub-part "
                       "boxes and (hybrid) one box per axial slice.")
    _add_template_option(p)
    p.add_argument("--image", required=True, help="query CT")
    p.add_argument("--out", required=True, help="output JSON file")
    _add_localizer_options(p)
    _add_device_option(p, deprecated_checkpoint=True)
    p.set_defaults(func=_cmd_localize)


def _cmd_localize(args) -> int:
    from .io import read_ct, write_text_atomic
    from .results import json_text

    _start_heavy_command(args, "--medlam-checkpoint", "medlam_checkpoint")
    image = read_ct(args.image)  # a bad image fails before any template work
    loc = _localizer_spec(args).build(args.template)
    result = loc.localize(image)
    write_text_atomic(args.out, json_text(result.to_json()))
    print(f"{'structure':<16} {'present':>7} {'conf':>5}  box_ijk")
    for name, r in result.structures.items():
        flag = "  <- review" if r.needs_review() else ""
        print(f"{name:<16} {str(r.present):>7} {r.confidence:5.2f}  {r.box_ijk}{flag}")
    print(f"wrote {args.out} ({loc.kind} localizer: {loc.setup_s:.1f} s templates, "
          f"{result.timing_s['total_query']:.1f} s query)")
    return 0


def _add_demo_command(sub) -> None:
    from .localizers import KINDS

    p = sub.add_parser("demo", help="run the built-in offline demonstration",
                       description="Three head-and-neck patients as templates holding only six points per "
                       "structure, three other patients segmented ('segment', default settings) and scored against "
                       "their clinical contours ('evaluate'). The data ships with MedLSAM; offline.")
    p.add_argument("--out", default="medlsam-demo", help="output folder (default ./medlsam-demo)")
    p.add_argument("--cases", type=int, default=3, help="number of cohort patients, 1-3 (default 3)")
    _add_device_option(p)
    p.add_argument("--localizer", choices=KINDS, default="auto",
                   help="which localizer (default auto: the most accurate on our benchmark)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from pathlib import Path

    from .demo import run_demo
    from .evaluate import markdown_table

    out = Path(args.out)
    summary = run_demo(out, cases=args.cases, device=args.device, localizer_kind=args.localizer)
    print("\n" + markdown_table(summary["metrics"]))
    print(f"segmentations (open in 3D Slicer): {out / 'results'}/*.seg.nrrd")
    print(f"reports: {out / 'results' / 'evaluation'} (metrics.md, boxplots.png, montage.png); {summary['seconds']:.0f} s")
    print("templates: six points per structure on three other patients (no masks); "
          "benchmark on 16 held-out scans: docs/results.md")
    return 0 if summary["batch"]["failed"] == 0 else 1


def _add_segment_command(sub) -> None:
    from .segment.slices import SegmentOptions  # its defaults are the CLI's

    p = sub.add_parser("segment", help="localize and segment template structures in a cohort of CTs",
                       description="For every CT: boxes from the localizer, then SAM-style segmentation of every slice "
                       "inside them. "
                       "Writes <case>.seg.nrrd, <case>_labels.nii.gz and <case>.json per case and summary.json.")
    _add_template_option(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", metavar="CT", help="CT file(s) or DICOM folder(s)")
    src.add_argument("--images-dir", help="folder of CTs")
    p.add_argument("--out", required=True, help="output folder")
    _add_localizer_options(p)
    p.add_argument("--segmenter", choices=SEGMENTERS, default=SEGMENTERS[0],
                   help="litemedsam (default; weights shipped), or SAM / MedSAM ViT-B with --segmenter-checkpoint")
    p.add_argument("--segmenter-checkpoint", dest="checkpoint",
                   help="SAM / MedSAM ViT-B weights (for --segmenter sam-vit-b / medsam-vit-b)")
    _add_device_option(p, deprecated_checkpoint=True)
    p.add_argument("--resume", action="store_true", help="skip cases whose outputs are complete")
    p.add_argument("--executor", choices=["local", "dask"], default="local",
                   help="local (default): this process; dask: one task per case on a Dask cluster "
                   "(pip install 'medlsam[distributed]')")
    p.add_argument("--scheduler", metavar="ADDRESS", help="with --executor dask: a running scheduler, e.g. tcp://host:8786")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --executor dask and no --scheduler: a local cluster of N worker processes (default 1)")
    p.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                   help="image encoder runtime: auto (default) = ONNX Runtime for LiteMedSAM on CPU, else torch")
    p.add_argument("--slice-step", type=int, default=SegmentOptions.slice_step, metavar="K",
                   help=f"encode every K-th slice of a structure (and its first, middle and last) and interpolate "
                   f"the others (default {SegmentOptions.slice_step}; 1 = every slice)")
    p.add_argument("--prompt", choices=["shape", "box"], default=SegmentOptions.prompt,
                   help="shape (default): one box per slice from the localized shape; box: the 3D box on every slice")
    p.add_argument("--prior-weight", type=float, default=SegmentOptions.prior_weight, metavar="W",
                   help="weight of the templates' masks carried onto the scan (label maps, or masks made from the six "
                   "points) against SAM: "
                   f"(1-W) x SAM + W x prior (default {SegmentOptions.prior_weight:g}; 0 = SAM alone)")
    p.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    p.add_argument("--no-fill-holes", action="store_true", help="do not fill holes slice by slice")
    p.add_argument("--allow-overlap", action="store_true",
                   help="do not resolve overlaps (by default the more probable structure wins)")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args) -> int:
    from pathlib import Path

    from .pipeline import list_cohort, prepare_out_dir, run_cohort
    from .results import REVIEW_BELOW
    from .segment.slices import SegmentOptions
    from .settings import RunSettings, SegmenterSpec

    _start_heavy_command(args, "--segmenter-checkpoint", "checkpoint")
    images = list_cohort(args.image, args.images_dir)
    prepare_out_dir(args.out)  # before any model is loaded: a wrong --out fails at once
    if args.executor == "local" and (args.scheduler or args.workers):
        raise InputError("--scheduler and --workers are for --executor dask")
    if args.slice_step < 1:
        raise InputError("--slice-step must be 1 or more")
    if not 0.0 <= args.prior_weight <= 1.0:
        raise InputError("--prior-weight must be between 0 and 1")
    options = SegmentOptions(largest_component=not args.no_largest_component, fill_holes=not args.no_fill_holes,
                             resolve_overlaps=not args.allow_overlap, slice_step=args.slice_step, prompt=args.prompt,
                             prior_weight=args.prior_weight)
    settings = RunSettings(tuple(str(Path(t).resolve()) for t in args.template), _localizer_spec(args),
                           SegmenterSpec(args.segmenter, args.checkpoint, args.runtime), options)
    if args.executor == "dask":
        from .cluster import run_cohort_dask
        from .templates import load_template

        summary = run_cohort_dask(settings, images, Path(args.out), resume=args.resume, scheduler=args.scheduler,
                                  workers=args.workers)
        names = list(load_template(settings.templates[0]).structures)
    else:
        cohort = settings.build()
        if cohort.localizer.device.type == "cpu":
            print("note: running on CPU", file=sys.stderr)
        summary = run_cohort(cohort, images, Path(args.out), resume=args.resume)
        names = cohort.localizer.structures
    print(f"\n{'case':<24} {'status':<8} {'s':>6}  " + "  ".join(f"{n[:12]:>12}" for n in names))
    for c in summary.cases:
        cells = []
        for n in names:
            st = c.structures.get(n)
            text = "-" if not st else ("absent" if not st.present else f"{st.confidence:.2f}")
            if st and st.present and st.visible_fraction is not None and st.visible_fraction < 0.95:
                text += f" ({100 * st.visible_fraction:.0f}%)"  # the scan shows only this share of it
            cells.append(f"{text:>12}")
        status = "earlier" if c.resumed else c.status
        print(f"{c.case:<24} {status:<8} {c.seconds:6.1f}  " + "  ".join(cells))
        if c.error:
            print(f"    error: {c.error}")
    counts = summary.counts
    print(f"\n{counts['ok'] - counts['resumed']} segmented, {counts['resumed']} finished earlier (--resume), "
          f"{counts['failed']} failed; "
          f"outputs in {args.out} (confidence per structure above, (N%): the share of a structure the scan shows; "
          f"review < {REVIEW_BELOW})")
    return 1 if counts["failed"] else 0


def _add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="compare segmentations with reference label maps (Dice, HD95, box IoU)",
                       description="Score every case in PRED (a 'medlsam segment' output folder) against reference "
                       "label maps. Writes PRED/evaluation/: metrics.csv, metrics.md, summary.json, boxplots.png, "
                       "montage.png. Empty predictions count as Dice 0.")
    p.add_argument("--pred", required=True, help="output folder of 'medlsam segment'")
    p.add_argument("--labels-dir", required=True, help="folder of reference label maps")
    p.add_argument("--labels-pattern", default="{case}_label.nii.gz",
                   help="reference file name for a case (default '{case}_label.nii.gz')")
    p.add_argument("--case-suffix", default="", help="strip this from case names first (e.g. _ct for pt_1_ct)")
    p.add_argument("--out", help="report folder (default PRED/evaluation)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from .evaluate import evaluate, markdown_table, summarize

    rows = evaluate(args.pred, args.labels_dir, args.labels_pattern, args.case_suffix, args.out)
    print(markdown_table(summarize(rows)))
    print(f"reports in {Path(args.out) if args.out else Path(args.pred) / 'evaluation'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medlsam",
        description="Localize and segment anatomical structures in 3D CT from a few annotated templates.",
    )
    parser.add_argument("--version", action="version", version=f"medlsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_template_commands(sub)
    _add_train_command(sub)
    _add_localize_command(sub)
    _add_demo_command(sub)
    _add_segment_command(sub)
    _add_evaluate_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"medlsam: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("medlsam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
