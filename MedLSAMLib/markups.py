"""3D Slicer markups files (``.mrk.json``) holding the six extreme points of a structure.

Only data is read from these files: JSON is parsed, never evaluated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import POINT_NAMES, lps_to_ras, points_as_array
from .io import read_json, write_text_atomic

#: Slicer 5.0-5.12 write this schema; we write it too so every supported Slicer reads our files.
SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)


def markups_document(name: str, points_lps, color=(1.0, 0.5, 0.0)) -> dict:
    """A Slicer markups document with one Fiducial node of six named points (LPS)."""
    pts = points_as_array(points_lps)
    control_points = [
        {
            "id": str(n + 1),
            "label": label,
            "description": f"{label} extreme point of {name}",
            "associatedNodeID": "",
            "position": [float(v) for v in pts[n]],
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for n, label in enumerate(POINT_NAMES)
    ]
    return {
        "@schema": SCHEMA_URL,
        "markups": [
            {
                "type": "Fiducial",
                "name": name,
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(POINT_NAMES),
                "controlPoints": control_points,
                "measurements": [],
                "display": {
                    "visibility": True,
                    "color": [float(c) for c in color],
                    "selectedColor": [float(c) for c in color],
                    "glyphType": "Sphere3D",
                    "glyphScale": 1.5,
                    "textScale": 2.5,
                },
            }
        ],
    }


def write_markups(path: str | os.PathLike, name: str, points_lps, color=(1.0, 0.5, 0.0)) -> None:
    write_text_atomic(path, json.dumps(markups_document(name, points_lps, color), indent=2) + "\n")


def read_markups(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """Read a ``.mrk.json`` with six named points; return (node name, (6, 3) LPS points).

    Accepts files written in LPS or RAS. Points are matched by label (case-insensitive),
    so their order in the file does not matter.
    """
    p = Path(path)
    doc = read_json(p, "markups file")
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups:
        raise InputError(f"{p}: no 'markups' list; is this a Slicer .mrk.json file?")
    if len(markups) != 1:
        raise InputError(f"{p}: holds {len(markups)} markups nodes; expected one node with six points")
    node = markups[0]
    if node.get("type") != "Fiducial":
        raise InputError(f"{p}: markups type is {node.get('type')!r}; expected a point list ('Fiducial')")
    system = node.get("coordinateSystem", "LPS")
    if system not in ("LPS", "RAS"):
        raise InputError(f"{p}: unknown coordinateSystem {system!r}")
    cps = node.get("controlPoints") or []
    cps = [cp for cp in cps if cp.get("positionStatus", "defined") not in ("undefined", "missing")]
    if len(cps) != len(POINT_NAMES):
        raise InputError(f"{p}: has {len(cps)} placed points; expected 6 ({', '.join(POINT_NAMES)})")
    by_label: dict[str, list[float]] = {}
    for cp in cps:
        label = str(cp.get("label", "")).strip().lower()
        if label not in POINT_NAMES:
            raise InputError(f"{p}: unknown point name {cp.get('label')!r}; expected one of {', '.join(POINT_NAMES)}")
        if label in by_label:
            raise InputError(f"{p}: point {label!r} appears twice")
        pos = cp.get("position")
        if not (isinstance(pos, list) and len(pos) == 3 and all(isinstance(v, (int, float)) for v in pos)):
            raise InputError(f"{p}: point {label!r} has no valid 3D position")
        if not np.all(np.isfinite(pos)):
            raise InputError(f"{p}: point {label!r} has a non-finite coordinate {pos}; place it again")
        by_label[label] = pos
    try:
        points = points_as_array(by_label)
    except ValueError as exc:  # GeometryError: non-finite or contradictory coordinates
        raise InputError(f"{p}: {exc}") from None
    if system == "RAS":
        points = lps_to_ras(points)  # the flip is its own inverse
    return str(node.get("name", p.name.split(".")[0])), points
