"""Calibrate the hybrid localizer's confidence: a logistic model of "the box is right" from the
evidence each structure's result carries, fitted on the rows of a ``field_of_view.py`` run.

Each present structure of the run (hard cases and full scans, head-and-neck and abdomen
templates) is an example: right when its box IoU against the part of the structure the scan
shows is >= 0.4, wrong when < 0.2 (in between: left out). The model's probability of "right"
is the confidence (``FusionSettings.confidence_weights``). Fit it on the ``other`` scans, then
judge it on the dev run's rows (``--check``), which it has not seen.

    python benchmarks/field_of_view.py --shared ../shared --scans other --out docs/bench/field_of_view_other
    python benchmarks/confidence_fit.py docs/bench/field_of_view_other.json --out docs/bench/confidence_fit
    python benchmarks/confidence_fit.py docs/bench/field_of_view.json --check   # the product's weights on dev
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from MedLSAMLib.localizers.fusion import CONFIDENCE_FEATURES, FusionSettings, confidence_features

from harness import table_head, write_results

GOOD, WRONG = 0.4, 0.2


def examples(rows: list[dict], arm: str | None):
    """(features [N, F], right [N] bool) of the present structures of one arm's rows."""
    keep = [r for r in rows if r["present"] and (arm is None or r["arm"] == arm)
            and (r["iou"] >= GOOD or r["iou"] < WRONG)]
    x = np.array([confidence_features(r["evidence"], r["templates"]) for r in keep])
    return x, np.array([r["iou"] >= GOOD for r in keep])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Weights (intercept first) of an L2-regularised logistic regression, by Newton's method."""
    a = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(a.shape[1])
    penalty = l2 * np.eye(a.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-a @ w))
        grad = a.T @ (p - y) + penalty @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a + penalty
        w -= np.linalg.solve(hess, grad)
    return w


def probabilities(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The logistic model's probability of "right" for features [N, F] and weights (intercept first)."""
    return 1.0 / (1.0 + np.exp(-(np.hstack([np.ones((len(x), 1)), x]) @ w)))


def flag_rows(x: np.ndarray, y: np.ndarray, w: np.ndarray, thresholds=(0.2, 0.3, 0.4, 0.5, 0.6)) -> list[dict]:
    p = probabilities(x, w)
    return [{"threshold": t, "wrong": int((~y).sum()), "wrong_flagged": int(((p < t) & ~y).sum()),
             "good": int(y.sum()), "good_flagged": int(((p < t) & y).sum())} for t in thresholds]


def case_kind(row: dict) -> str:
    """The row's case kind, with the two directions of "abdomen" apart (field_of_view.py names the
    abdomen CT's own case ``ts_abdpelvis``)."""
    if row["kind"] != "abdomen":
        return row["kind"]
    return ("abdomen: head-and-neck templates on the abdomen CT" if row["case"] == "ts_abdpelvis"
            else "abdomen: the abdomen template on head-and-neck scans")


def by_kind(rows: list[dict], arm: str, w: np.ndarray, confident: float = 0.3) -> list[str]:
    """Table lines, per case kind: the present boxes, the confident wrong ones (confidence >=
    ``confident``, IoU < WRONG) and the highest confidence of a wrong box."""
    present = [r for r in rows if r["present"] and r["arm"] == arm]
    p = probabilities(np.array([confidence_features(r["evidence"], r["templates"]) for r in present]), w)
    out = table_head(["case kind", "present boxes", f"confident (>= {confident}) and wrong (IoU < {WRONG})",
                      "most confident wrong box"])
    for kind in sorted({case_kind(r) for r in present}):
        idx = [i for i, r in enumerate(present) if case_kind(r) == kind]
        wrong = [i for i in idx if present[i]["iou"] < WRONG]
        top = max((p[i] for i in wrong), default=0.0)
        out.append(f"| {kind} | {len(idx)} | {sum(p[i] >= confident for i in wrong)} | {top:.2f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="a field_of_view.py result (.json)")
    ap.add_argument("--arm", default=None, help="the arm whose rows to use (default: the first)")
    ap.add_argument("--check", action="store_true", help="judge the product's weights on these rows (no fit)")
    ap.add_argument("--out", help="with a fit: OUT.json and OUT.md")
    args = ap.parse_args()
    data = json.loads(open(args.rows).read())
    arm = args.arm or next(iter(data["arms"]))
    x, y = examples(data["rows"], arm)
    if args.check:
        w = np.array(FusionSettings().confidence_weights)
    else:
        w = fit_logistic(x, y)
    table = flag_rows(x, y, w)
    lines = [f"{'Product weights on' if args.check else 'Fitted on'} {args.rows} (arm {arm}): {len(y)} present "
             f"structures, {int(y.sum())} right (IoU >= {GOOD}), {int((~y).sum())} wrong (IoU < {WRONG}).", "",
             "weights: " + ", ".join(f"{n} {v:+.3f}" for n, v in zip(("intercept", *CONFIDENCE_FEATURES), w)), ""]
    lines += table_head(["threshold", "wrong boxes flagged", "right boxes flagged"])
    lines += [f"| {r['threshold']} | {r['wrong_flagged']} / {r['wrong']} | {r['good_flagged']} / {r['good']} |" for r in table]
    if args.check:
        lines += ["", *by_kind(data["rows"], arm, w)]
    text = "\n".join(lines)
    if args.out:
        write_results(args.out, {"rows": args.rows, "arm": arm, "weights": w.round(4).tolist(),
                                 "features": list(CONFIDENCE_FEATURES), "flags": table}, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
