"""What the misses on the hard cases are: field-of-view failures, or misses the full scan makes too?

Reads a ``field_of_view.py`` run and, per template kind and case kind, splits the structures a
hard case shows half or more of by how the same structure fared on the same patient's full scan:
found there (box IoU >= 0.4), or missed there too. A miss whose full scan was found is one that
the field of view caused; the others are the localizer's precision on that patient. Then it lists
the former, with the full scan's IoU beside the hard case's.

    python benchmarks/fov_misses.py docs/bench/field_of_view_tenth.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

FOUND_IOU = 0.4
HALF = 0.5


def found(row: dict) -> bool:
    return bool(row["present"]) and row["iou"] >= FOUND_IOU


def split_by_full_scan(rows: list[dict], arm: str) -> tuple[dict, list]:
    """{case kind: [found where the full scan found it, of how many, found where the full scan missed
    it, of how many]} over structures shown half or more, and the rows missed where the full scan found
    them (each with its full-scan row)."""
    full = {(r["case"], r["structure"]): r for r in rows if r["arm"] == arm and r["kind"] == "full"}
    table, caused = defaultdict(lambda: [0, 0, 0, 0]), []
    for r in rows:
        whole = full.get((r["case"], r["structure"]))
        if r["arm"] != arm or r["kind"] == "full" or r["shown"] < HALF or whole is None:
            continue
        cell = table[r["kind"]]
        if found(whole):
            cell[0] += found(r)
            cell[1] += 1
            if not found(r):
                caused.append((r, whole))
        else:
            cell[2] += found(r)
            cell[3] += 1
    return dict(table), caused


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="field_of_view.py results (JSON)")
    args = ap.parse_args()
    rows = json.loads(args.run.read_text())["rows"]
    for arm in sorted({r["arm"] for r in rows}):
        table, caused = split_by_full_scan(rows, arm)
        print(f"\n{arm}\n")
        print("| case kind | found where the full scan found it | found where the full scan missed it |")
        print("|---|---|---|")
        for kind, (a, n, b, m) in sorted(table.items()):
            print(f"| {kind} | {a} / {n} ({100 * a / max(n, 1):.0f} %) | {b} / {m} |")
        print("\nmissed where the full scan found it:")
        for r, whole in caused:
            print(f"  {r['kind']:8s} {r['case']:24s} {r['structure']:13s} shown {r['shown']:.2f}  IoU {r['iou']:.2f} "
                  f"(full scan {whole['iou']:.2f})  confidence {r['confidence']:.2f}")


if __name__ == "__main__":
    main()
