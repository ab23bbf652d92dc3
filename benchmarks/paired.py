"""Two runs of the same cases, compared case by case: is a change in mean Dice larger than what
the method's sensitivity to small changes would give anyway?

Reads two results of ``template_kinds.py`` (rows: case -> arm -> structure -> dice) and prints,
per template kind, the mean Dice of each run, their difference, a 95 % interval of that
difference from a paired bootstrap over *cases* (the structures of one case share its alignment,
so they are resampled together), and how many structure-cases moved by a point or more either way.

    python benchmarks/paired.py docs/bench/template_kinds_sixth_code.json docs/bench/template_kinds_ninth.json

Two arms of one run: the same file twice and ``--pairs BEFORE_ARM:AFTER_ARM``, e.g.
``--pairs labels_affine:labels points_affine:points``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def dice_table(path: Path, arm: str) -> dict[str, dict[str, float]]:
    """case -> structure -> Dice of one arm of a run."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {r["case"]: {s: v["dice"] for s, v in r["arms"][arm].items()} for r in rows if arm in r["arms"]}


def paired_difference(before: dict, after: dict, draws: int = 10000, seed: int = 0) -> dict:
    """Mean Dice of both runs over the structure-cases they share, the difference (after - before),
    its 95 % paired bootstrap interval over cases, and the counts that moved by >= 1 point."""
    cases = sorted(set(before) & set(after))
    if not cases:
        raise ValueError("the two runs share no case")
    pairs = [[(before[c][s], after[c][s]) for s in sorted(set(before[c]) & set(after[c]))] for c in cases]
    per_case = np.array([sum(b - a for a, b in p) for p in pairs])  # summed per case, then over cases
    counts = np.array([len(p) for p in pairs])
    flat = np.array([x for p in pairs for x in p])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(cases), size=(draws, len(cases)))
    boot = per_case[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    moved = flat[:, 1] - flat[:, 0]
    return {"cases": len(cases), "structures": int(len(flat)), "before": float(flat[:, 0].mean()),
            "after": float(flat[:, 1].mean()), "difference": float(moved.mean()), "interval": [float(lo), float(hi)],
            "better": int((moved >= 0.01).sum()), "worse": int((moved <= -0.01).sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="template_kinds.py results (JSON) of the earlier code")
    ap.add_argument("after", type=Path, help="the same for the later code")
    ap.add_argument("--arms", nargs="+", default=["labels", "points"])
    ap.add_argument("--pairs", nargs="+", metavar="BEFORE_ARM:AFTER_ARM",
                    help="compare these arms (of before and after) instead of the same arm in both")
    args = ap.parse_args()
    pairs = [p.split(":", 1) for p in args.pairs] if args.pairs else [(a, a) for a in args.arms]
    print("| templates hold | cases (structures) | before % | after % | difference, points (95 % interval) "
          "| moved >= 1 point: better / worse |")
    print("|---|---|---|---|---|---|")
    for first, second in pairs:
        arm = first if first == second else f"{first} -> {second}"
        r = paired_difference(dice_table(args.before, first), dice_table(args.after, second))
        lo, hi = (100 * v for v in r["interval"])
        print(f"| {arm} | {r['cases']} ({r['structures']}) | {100 * r['before']:.1f} | {100 * r['after']:.1f} | "
              f"{100 * r['difference']:+.1f} ({lo:+.1f} to {hi:+.1f}) | {r['better']} / {r['worse']} |")


if __name__ == "__main__":
    main()
