"""Standard terminology for segments (SNOMED CT codes, as Slicer's terminologies and DCMQI use).

A structure's terminology is a dict in ``slicerio``'s form, which is also how it is kept in
``template.json``::

    {"contextName": "Segmentation category and type - DICOM master list",
     "category": ["SCT", "123037004", "Anatomical Structure"],
     "type": ["SCT", "45289007", "Parotid gland"],
     "typeModifier": ["SCT", "24028007", "Right"],          # optional
     "anatomicContextName": "Anatomic codes - DICOM master list",
     "anatomicRegion": ["SCT", "122495006", "Thoracic spine"]}  # optional

Slicer shows a segment that carries one under its standard name and colour, and its DICOM SEG
export carries the codes. :func:`terminology_for` knows common head-and-neck, thoracic and
abdominal structures by name (codes as in AAPM TG-263's SNOMED CT mapping and the DICOM master
list); other names get none.
"""
from __future__ import annotations

import re

from .errors import InputError

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
RIGHT = ["SCT", "24028007", "Right"]
LEFT = ["SCT", "7771000", "Left"]

# base name (lower case, words separated by one space) -> (SNOMED CT code, meaning, paired organ)
_KNOWN = {
    "brainstem": ("15926001", "Brainstem", False),
    "spinal cord": ("2748008", "Spinal cord", False),
    "parotid": ("45289007", "Parotid gland", True),
    "submandibular": ("385296007", "Submandibular gland", True),
    "esophagus": ("32849002", "Esophagus", False),
    "larynx": ("4596009", "Larynx", False),
    "mandible": ("91609006", "Mandible", False),
    "brain": ("12738006", "Brain", False),
    "eye": ("81745001", "Eye", True),
    "optic nerve": ("18234004", "Optic nerve", True),
    "cochlea": ("80169004", "Cochlea", True),
    "oral cavity": ("74262004", "Oral cavity", False),
    "pharynx": ("54066008", "Pharynx", False),
    "thyroid": ("69748006", "Thyroid gland", False),
    "trachea": ("44567001", "Trachea", False),
    "lung": ("39607008", "Lung", True),
    "heart": ("80891009", "Heart", False),
    "aorta": ("15825003", "Aorta", False),
    "liver": ("10200004", "Liver", False),
    "spleen": ("78961009", "Spleen", False),
    "kidney": ("64033007", "Kidney", True),
    "adrenal": ("23451007", "Adrenal gland", True),
    "pancreas": ("15776009", "Pancreas", False),
    "stomach": ("69695003", "Stomach", False),
    "gallbladder": ("28231008", "Gallbladder", False),
    "urinary bladder": ("89837001", "Urinary bladder", False),
    "rectum": ("34402009", "Rectum", False),
    "prostate": ("41216001", "Prostate", False),
    "femur": ("71341001", "Femur", True),
}
# other spellings and names -> base name
_ALIASES = {
    "brain stem": "brainstem", "spinalcord": "spinal cord", "cord": "spinal cord", "parotid gland": "parotid",
    "submandibular gland": "submandibular", "submand": "submandibular", "oesophagus": "esophagus",
    "eyeball": "eye", "opticnrv": "optic nerve", "thyroid gland": "thyroid", "glnd thyroid": "thyroid",
    "glnd submand": "submandibular", "lungs": "lung", "adrenal gland": "adrenal", "gall bladder": "gallbladder",
    "bladder": "urinary bladder", "cavity oral": "oral cavity", "bone mandible": "mandible",
}
# the vertebral column by region: type Vertebra, anatomic region the spine segment
_SPINE = {"cervical": ("122494005", "Cervical spine"), "thoracic": ("122495006", "Thoracic spine"),
          "lumbar": ("122496007", "Lumbar spine")}
_VERTEBRA = ["SCT", "51282000", "Vertebra"]
_SIDES = {"right": RIGHT, "r": RIGHT, "rt": RIGHT, "left": LEFT, "l": LEFT, "lt": LEFT}


def _words(name: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)  # RightParotid -> Right Parotid
    return [w for w in re.split(r"[\s_\-.]+", spaced.lower()) if w]


def terminology_for(name: str) -> dict | None:
    """The standard terminology of a structure known by its name ("RightParotid", "Parotid_L",
    "left lung", "Brain Stem", "thoracic vertebral column", ...), or None."""
    words = _words(name)
    side = None
    for i in (0, len(words) - 1):
        if len(words) > 1 and words[i] in _SIDES:
            side = _SIDES[words.pop(i)]
            break
    base = " ".join(words)
    spine = [w for w in words if w in _SPINE]
    if spine and ({"vertebral", "spine", "vertebrae", "column"} & set(words)):
        code, meaning = _SPINE[spine[0]]
        return {"contextName": CATEGORY_CONTEXT, "category": list(ANATOMICAL_STRUCTURE), "type": list(_VERTEBRA),
                "anatomicContextName": REGION_CONTEXT, "anatomicRegion": ["SCT", code, meaning]}
    base = _ALIASES.get(base, base)
    if base not in _KNOWN:
        return None
    code, meaning, paired = _KNOWN[base]
    entry = {"contextName": CATEGORY_CONTEXT, "category": list(ANATOMICAL_STRUCTURE), "type": ["SCT", code, meaning]}
    if paired and side is not None:
        entry["typeModifier"] = list(side)
    return entry


_CODE_KEYS = ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")
_TEXT_KEYS = ("contextName", "anatomicContextName")
_RESERVED = re.compile(r"[~^|]")  # separators of Slicer's terminology tag


def check_terminology(entry, where: str) -> dict:
    """Validate a terminology dict read from a template (plain data: three strings per code)."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: 'terminology' must be an object with 'category' and 'type' codes")
    unknown = sorted(set(entry) - set(_CODE_KEYS) - set(_TEXT_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown terminology field(s) {', '.join(unknown)}")
    for key in ("category", "type"):
        if key not in entry:
            raise InputError(f"{where}: terminology needs '{key}' ([scheme, code, meaning])")
    out = {}
    for key, value in entry.items():
        if key in _CODE_KEYS:
            ok = isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)
            if not ok:
                raise InputError(f"{where}: terminology '{key}' must be [scheme, code, meaning] (three strings)")
        elif not isinstance(value, str):
            raise InputError(f"{where}: terminology '{key}' must be a string")
        if any(_RESERVED.search(v) for v in (value if isinstance(value, list) else [value])):
            raise InputError(f"{where}: terminology '{key}' must not contain '~', '^' or '|'")
        out[key] = list(value) if isinstance(value, list) else value
    return out


def to_slicer_string(entry: dict) -> str:
    """Slicer's TerminologyEntry tag: seven '~'-separated fields, each code 'scheme^value^meaning'."""
    def code(key):
        return "^".join(entry.get(key) or ["", "", ""])

    return "~".join([entry.get("contextName", CATEGORY_CONTEXT), code("category"), code("type"), code("typeModifier"),
                     entry.get("anatomicContextName", ""), code("anatomicRegion"),
                     code("anatomicRegionModifier")])
