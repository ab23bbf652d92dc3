"""Templates: one CT plus, per structure, its six extreme points.

On disk a template is a folder::

    template.json            manifest: image path, structures (name, label, color, window, terminology)
    <Structure>.mrk.json     the six extreme points, a Slicer markups file (LPS)

``template.json`` is plain data; nothing read from it is executed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import POINT_NAMES, Geometry, point_axis, validate_extreme_points
from .io import Volume, read_ct, read_json, read_labels, write_text_atomic, write_volume
from .markups import read_markups, write_markups
from .terminology import check_terminology, terminology_for

MANIFEST = "template.json"
FORMAT = "medlsam-template"
VERSION = 1

# Distinct, colour-blind friendly defaults, indexed by label value.
_PALETTE = [
    (0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26),
    (0.00, 0.45, 0.70), (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.60, 0.60, 0.60),
]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


def default_color(label: int) -> tuple[float, float, float]:
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def check_structure_name(name: str) -> str:
    """Structure names become file names: letters, digits, space, '_', '-', '.' only."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name.endswith("."):
        raise InputError(
            f"invalid structure name {name!r}: use letters, digits, spaces, '_', '-' or '.' (max 64 characters)"
        )
    return name


@dataclass
class Structure:
    name: str
    label: int
    points: np.ndarray  # (6, 3) LPS mm in POINT_NAMES order
    color: tuple[float, float, float] = (1.0, 0.5, 0.0)
    window: tuple[float, float] | None = None  # SAM display window in HU, if not the default
    terminology: dict | None = None  # standard codes (see MedLSAMLib.terminology), carried into .seg.nrrd

    def __post_init__(self):
        check_structure_name(self.name)
        if int(self.label) < 1 or int(self.label) > 65535:
            raise InputError(f"structure {self.name}: label value must be 1..65535, got {self.label}")
        self.label = int(self.label)
        try:
            self.points = validate_extreme_points(self.points)
        except ValueError as exc:
            raise InputError(f"structure {self.name}: {exc}") from None
        if self.window is not None:
            lo, hi = (float(v) for v in self.window)
            if not hi > lo:
                raise InputError(f"structure {self.name}: window must be [low, high] with low < high")
            self.window = (lo, hi)
        if self.terminology is not None:
            self.terminology = check_terminology(self.terminology, f"structure {self.name}")

    def point(self, name: str) -> np.ndarray:
        return self.points[POINT_NAMES.index(name)]


@dataclass
class Template:
    image_path: Path
    structures: dict[str, Structure] = field(default_factory=dict)
    directory: Path | None = None
    labels_path: Path | None = None  # optional label map (enables sub-part localization, SPL)

    @property
    def name(self) -> str:
        return self.directory.name if self.directory else self.image_path.name

    def load_image(self) -> Volume:
        if not Path(self.image_path).exists():
            raise InputError(f"template {self.name}: its CT {self.image_path} is missing (moved or deleted?); "
                             f"put it back or fix 'image' in {MANIFEST}")
        vol = read_ct(self.image_path)
        check_points_inside(self, vol.geometry)
        return vol

    def load_labels(self) -> Volume | None:
        return read_labels(self.labels_path) if self.labels_path else None

    def require(self, names) -> list[Structure]:
        """The named structures, or a one-line error naming what this template lacks."""
        missing = [n for n in names if n not in self.structures]
        if missing:
            raise InputError(f"template {self.name}: structure(s) {', '.join(missing)} not defined "
                             f"(it has {', '.join(self.structures) or 'none'})")
        return [self.structures[n] for n in names]


def check_points_inside(template: Template, geometry: Geometry) -> None:
    for s in template.structures.values():
        inside = geometry.contains_lps(s.points, tolerance=0.5)
        if not np.all(inside):
            bad = [POINT_NAMES[i] for i in np.flatnonzero(~inside)]
            raise InputError(f"template {template.name}: {s.name} point(s) {', '.join(bad)} lie outside the image")


# --- disk format -------------------------------------------------------------------------
def save_template(template: Template, directory: str | os.PathLike) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in template.structures.values():
        mrk = f"{s.name}.mrk.json"
        write_markups(d / mrk, s.name, s.points, s.color)
        entry = {"name": s.name, "label": s.label, "color": [round(c, 4) for c in s.color], "points": mrk}
        if s.window is not None:
            entry["window"] = list(s.window)
        if s.terminology is not None:
            entry["terminology"] = s.terminology
        entries.append(entry)
    manifest = {"format": FORMAT, "version": VERSION, "image": _path_ref(template.image_path, d),
                "structures": entries}
    if template.labels_path:
        manifest["labels"] = _path_ref(template.labels_path, d)
    write_text_atomic(d / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    template.directory = d
    return d


def _path_ref(path, directory: Path) -> str:
    """Relative only when the file sits inside the template folder (the folder then moves as one)."""
    p = Path(path).resolve()
    return str(p.relative_to(directory.resolve())) if p.is_relative_to(directory.resolve()) else str(p)


def _resolve_ref(ref, directory: Path, what: str, manifest_path: Path) -> Path:
    if not isinstance(ref, str) or not ref:
        raise InputError(f"{manifest_path}: '{what}' must be a file path")
    return Path(ref) if os.path.isabs(ref) else directory / ref


def load_template(directory: str | os.PathLike) -> Template:
    d = Path(directory)
    manifest_path = d / MANIFEST if d.is_dir() else d
    d = manifest_path.parent
    manifest = read_json(manifest_path, "template manifest",
                         " (not a template folder? create one with 'medlsam template from-labels')")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{manifest_path}: not a MedLSAM template manifest (format must be {FORMAT!r})")
    if int(manifest.get("version", 0)) > VERSION:
        raise InputError(f"{manifest_path}: template version {manifest.get('version')} is newer than this MedLSAM")
    image_path = _resolve_ref(manifest.get("image"), d, "image", manifest_path)
    labels_path = _resolve_ref(manifest["labels"], d, "labels", manifest_path) if manifest.get("labels") else None
    entries = manifest.get("structures")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{manifest_path}: 'structures' must be a non-empty list")
    template = Template(image_path=image_path, directory=d, labels_path=labels_path)
    labels_seen: dict[int, str] = {}
    for e in entries:
        if not isinstance(e, dict) or "name" not in e or "label" not in e:
            raise InputError(f"{manifest_path}: every structure needs 'name' and 'label'")
        try:
            name = check_structure_name(e["name"])
        except InputError as exc:
            raise InputError(f"{manifest_path}: {exc}") from None
        points_file = e.get("points", f"{name}.mrk.json")
        if not isinstance(points_file, str) or Path(points_file).name != points_file:
            raise InputError(f"{manifest_path}: structure {name}: 'points' must be a file name inside the template folder")
        _, points = read_markups(d / points_file)
        if e.get("terminology") is not None:
            check_terminology(e["terminology"], f"{manifest_path}: structure {name}")
        try:
            s = Structure(name=name, label=e["label"], points=points,
                          color=tuple(e.get("color") or default_color(e["label"])), window=e.get("window"),
                          terminology=e.get("terminology"))
        except InputError as exc:  # e.g. contradictory points: name the file to fix
            raise InputError(f"{d / points_file}: {exc}") from None
        if s.name in template.structures:
            raise InputError(f"{manifest_path}: structure {s.name} is listed twice")
        if s.label in labels_seen:
            raise InputError(f"{manifest_path}: label {s.label} used by both {labels_seen[s.label]} and {s.name}")
        labels_seen[s.label] = s.name
        template.structures[s.name] = s
    return template


# --- from a label map ---------------------------------------------------------------------
def extreme_points_from_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Six LPS extreme points of a binary mask (``[k, j, i]``), each on a foreground voxel centre.

    For each direction, the voxels whose physical coordinate along that axis is extreme (within
    a quarter voxel, so oblique grids still give a band) are collected, and the one nearest
    their centroid is taken: a representative point on the structure's extreme face.
    """
    kji = np.argwhere(mask)
    if kji.size == 0:
        raise InputError("structure is empty")
    return extreme_points_of_cloud(geometry.ijk_to_lps(kji[:, ::-1].astype(float)), 0.25 * float(geometry.spacing.min()))


def extreme_points_of_cloud(lps: np.ndarray, tol: float) -> np.ndarray:
    """Six extreme points (POINT_NAMES order) of an (N, 3) LPS point cloud, each one of its points."""
    out = np.empty((6, 3))
    for n, name in enumerate(POINT_NAMES):
        axis, sign = point_axis(name)
        v = sign * lps[:, axis]
        band = lps[v >= v.max() - tol]
        out[n] = band[np.argmin(np.linalg.norm(band - band.mean(axis=0), axis=1))]
    return out


def segments_of(labels_path) -> dict[int, tuple[str, tuple, dict | None]] | None:
    """A Slicer segmentation file's segments (``.seg.nrrd``, e.g. MedLSAM's own output or a
    reviewed case): {label value: (name, colour, terminology)}; None for a plain label map."""
    if not str(labels_path).lower().endswith(".seg.nrrd"):
        return None
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(labels_path), skip_voxels=True)
    except Exception as exc:  # slicerio raises plain errors on a file that is not a segmentation
        raise InputError(f"{labels_path}: not a readable Slicer segmentation ({exc})") from None
    out = {}
    for segment in seg.get("segments", []):
        if int(segment.get("layer", 0)) != 0:
            raise InputError(f"{labels_path}: its segments overlap (several layers); export it from Slicer as a "
                             "label map, or collapse the layers, and try again")
        color = tuple(float(c) for c in segment.get("color", default_color(int(segment["labelValue"]))))
        out[int(segment["labelValue"])] = (segment["name"], color, segment.get("terminology"))
    return out


def read_color_table(path) -> dict[int, tuple[str, tuple, None]]:
    """A label map's colour table: {label value: (name, colour 0..1, None)}. Reads Slicer's colour
    tables (``.ctbl`` / ``.txt``: ``value name R G B A``, 0-255; ``.csv`` with the columns
    LabelValue, Name, Color_R, Color_G, Color_B as Slicer 5.6+ saves them) and ITK-SNAP label
    descriptions (``value R G B A visible mesh "name"``). Value 0 (background) is left out.
    Names are read as text only; a name that cannot be a structure name fails when it is used."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable colour table ({exc.__class__.__name__})") from None
    if lines and lines[0].startswith("LabelValue,"):
        import csv

        parse, rows = _csv_color_row, enumerate(csv.DictReader(lines), 2)
    else:
        parse, rows = _text_color_row, ((n, ln) for n, ln in enumerate(lines, 1)
                                        if ln.strip() and not ln.lstrip().startswith("#"))
    out = {}
    for number, row in rows:
        try:
            value, name, rgb = parse(row)
            color = tuple(round(int(c) / 255.0, 4) for c in rgb)
        except (ValueError, IndexError, KeyError, TypeError):  # TypeError: a CSV row short of columns
            raise InputError(f"{path}, line {number}: expected 'value name R G B A' (Slicer colour table), a "
                             "Slicer CSV colour table row or an ITK-SNAP label line") from None
        if value != 0:
            out[value] = (name, color, None)
    if not out:
        raise InputError(f"{path}: the colour table names no label (only comments or background)")
    return out


def _text_color_row(line: str):
    """(value, name, [R, G, B]) of a Slicer .ctbl/.txt line or an ITK-SNAP label line."""
    import shlex

    fields = shlex.split(line)
    if '"' in line:  # ITK-SNAP: value R G B A visible mesh "name"
        return int(fields[0]), fields[7], fields[1:4]
    return int(fields[0]), " ".join(fields[1:-4]), fields[-4:-1]  # Slicer: value name R G B A


def _csv_color_row(row: dict):
    """(value, name, [R, G, B]) of a row of a Slicer CSV colour table."""
    return int(row["LabelValue"]), row["Name"], [row["Color_R"], row["Color_G"], row["Color_B"]]


def _usable_terminology(terminology, where) -> dict | None:
    """A segment's terminology if it is in the form templates keep, else None (its name decides)."""
    if not terminology:
        return None
    try:
        return check_terminology(terminology, str(where))
    except InputError:
        return None


def _on_image_grid(labels: Volume, image: Volume, labels_path) -> Volume:
    """The label map on the image's grid: as it is, or pasted at a whole-voxel offset (Slicer saves a
    segmentation cropped to its content); any other grid is refused."""
    if labels.geometry.is_close(image.geometry, atol=1e-3):
        return labels
    lg, ig = labels.geometry, image.geometry
    offset = ig.lps_to_ijk(lg.origin)
    if (np.allclose(lg.spacing, ig.spacing, atol=1e-3) and np.allclose(lg.direction, ig.direction, atol=1e-4)
            and np.allclose(offset, np.rint(offset), atol=1e-2)):
        lo = np.rint(offset).astype(int)
        hi = lo + np.asarray(lg.size)
        if np.all(lo >= 0) and np.all(hi <= np.asarray(ig.size)):
            array = np.zeros(ig.shape_kji, labels.array.dtype)
            array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = labels.array
            return Volume(array, ig, labels.name, dict(labels.meta))
    raise InputError(f"{labels_path}: label map geometry differs from the image {image.meta.get('path', image.name)}")


def template_from_labels(image_path, labels_path, structures: list[tuple[int, str]], out_dir,
                         windows: dict[str, tuple[float, float]] | None = None, color_table=None) -> Template:
    """Derive a template (six points per structure) from a CT and its label map; write it.

    A Slicer ``.seg.nrrd`` (MedLSAM's own output, a reviewed case) names its structures itself:
    with no ``structures`` every segment is taken, with its name, colour and terminology;
    ``structures`` (label, name) then select and rename. A plain label map does the same with a
    ``color_table`` (see :func:`read_color_table`): every label in the map that the table names."""
    segments = segments_of(labels_path)
    if color_table is not None:
        if segments is not None:
            raise InputError(f"{labels_path} names its segments itself; a colour table is for a plain label map")
        segments = read_color_table(color_table)
    image = read_ct(image_path)
    stored = read_labels(labels_path)
    if not structures and segments:
        in_map = set(int(v) for v in np.unique(stored.array)) if color_table is not None else set(segments)
        structures = [(label, name) for label, (name, _, _) in sorted(segments.items()) if label in in_map]
        if not structures:
            raise InputError(f"{color_table}: none of its labels is in {labels_path}")
    if not structures:
        raise InputError("name at least one structure, e.g. --structure 1:Brainstem, or give the label map's "
                         "--color-table")
    labels = _on_image_grid(stored, image, labels_path)
    template = Template(image_path=Path(image_path), labels_path=Path(labels_path))
    for label, name in structures:
        check_structure_name(name)
        mask = labels.array == int(label)
        if not mask.any():
            present = sorted(int(v) for v in np.unique(labels.array) if v != 0)
            raise InputError(f"structure {name} (label {label}) is absent from {labels_path} (labels present: {present})")
        points = extreme_points_from_mask(mask, labels.geometry)
        _, color, terminology = (segments or {}).get(int(label), (name, default_color(label), None))
        template.structures[name] = Structure(name, int(label), points, color, (windows or {}).get(name),
                                              _usable_terminology(terminology, labels_path) or terminology_for(name))
    if labels is not stored:  # cropped in the file: the label map on the image's grid goes beside
        template.labels_path = Path(out_dir) / "labels.nii.gz"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_volume(labels, template.labels_path)
    save_template(template, out_dir)
    return template


def parse_structure_spec(spec: str) -> tuple[int, str]:
    """'7:Mandible' -> (7, 'Mandible')."""
    label, sep, name = spec.partition(":")
    if not sep or not label.strip().isdigit() or not name.strip():
        raise InputError(f"--structure {spec!r}: expected LABEL:NAME, e.g. 1:Brainstem")
    return int(label), check_structure_name(name.strip())


def load_template_set(template_dirs, structures: list[str] | None = None) -> tuple[list[Template], list[str]]:
    """Templates (folders or already loaded) and the structure names to localize: the given ones,
    else the first template's; every template must define all of them (one-line error if not)."""
    templates = [t if isinstance(t, Template) else load_template(t) for t in template_dirs]
    if not templates:
        raise InputError("give at least one --template")
    names = list(structures or templates[0].structures)
    for t in templates:
        t.require(names)
    return templates, names
