"""Write MedLSAMLib/data/demo/ (what ``medlsam demo`` runs on) from the shared OpenKBP cases.

Three template patients hold only the six extreme points of each structure (taken from their
clinical contours, as a clinician would click them) beside their CT; three other patients form
the cohort, with their clinical contours for scoring. The files are byte-for-byte copies of the
OpenKBP files (SHA256SUMS in the demo folder; shared/data/SHA256SUMS lists the same sums). None
is a protocol template (support_candidates_core5[:5]) or an evaluation case (dev_eval_*).

    python scripts/make_demo_data.py --shared ../shared
"""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

from MedLSAMLib.io import read_labels
from MedLSAMLib.templates import Structure, Template, default_color, extreme_points_from_mask, save_template
from MedLSAMLib.terminology import terminology_for

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "MedLSAMLib" / "data" / "demo"
TEMPLATES = ["train-pats/pt_188", "train-pats/pt_137", "train-pats/pt_164"]
COHORT = ["train-pats/pt_183", "train-pats/pt_40", "train-pats/pt_16"]
STRUCTURES = [(1, "Brainstem"), (2, "SpinalCord"), (3, "RightParotid"), (4, "LeftParotid"), (7, "Mandible")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    args = ap.parse_args()
    hn = Path(args.shared) / "data" / "openkbp_hn"
    splits = json.loads((hn / "splits.json").read_text())
    forbidden = set(splits["support_candidates_core5"][:5]) | set(splits["dev_eval_core5"]) | set(splits["dev_eval_all7"])
    assert not forbidden & set(TEMPLATES + COHORT), "a protocol template or evaluation case"
    assert set(TEMPLATES + COHORT) <= set(splits["ssl_train"])
    if OUT.exists():
        shutil.rmtree(OUT)
    copied = []
    for case in TEMPLATES:
        name = Path(case).name
        folder = OUT / "templates" / name
        folder.mkdir(parents=True)
        shutil.copyfile(hn / f"{case}_ct.nii.gz", folder / f"{name}_ct.nii.gz")
        copied.append(folder / f"{name}_ct.nii.gz")
        labels = read_labels(hn / f"{case}_label.nii.gz")
        structures = {n: Structure(n, v, extreme_points_from_mask(labels.array == v, labels.geometry), default_color(v),
                                   None, terminology_for(n)) for v, n in STRUCTURES}
        save_template(Template(folder / f"{name}_ct.nii.gz", structures), folder)  # six points only, no labels
    for case in COHORT:
        name = Path(case).name
        for kind, sub in (("ct", "cohort"), ("label", "cohort_labels")):
            target = OUT / sub / f"{name}_{kind}.nii.gz" if kind == "label" else OUT / sub / f"{name}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hn / f"{case}_{kind}.nii.gz", target)
            copied.append(target)
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(OUT).as_posix()}" for p in copied]
    (OUT / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print(f"wrote {OUT} ({len(copied)} images)")


if __name__ == "__main__":
    main()
