"""The affine-atlas baseline (``--localizer registration``): SimpleITK affine per template, points
mapped, per-coordinate median. Kept as a reference arm and for users who want plain atlas
registration; the hybrid localizer is faster and more accurate (docs/results.md)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..geometry import box_from_points
from ..io import Volume, read_ct
from ..registration import localize_by_registration
from ..templates import load_template_set
from .fusion import fuse_boxes


class RegistrationLocalizer:
    kind = "registration"

    def __init__(self, template_dirs, *, mode: str = "wpl", structures: list[str] | None = None):
        t0 = time.perf_counter()
        self.mode = mode
        self.device = torch.device("cpu")  # SimpleITK runs on the CPU
        self.templates, self.structures = load_template_set(template_dirs, structures)
        self.images = [t.load_image() for t in self.templates]
        self.setup_s = time.perf_counter() - t0

    def describe(self) -> dict:
        return {"kind": self.kind}

    def localize(self, image: str | Path | Volume) -> dict:
        t0 = time.perf_counter()
        volume = image if isinstance(image, Volume) else read_ct(image)
        result = localize_by_registration(list(zip(self.templates, self.images)), volume, self.structures)
        for name, entry in result["structures"].items():
            per_template = np.stack([box_from_points(p) for p in entry.pop("per_template_points_lps")])
            entry["confidence"] = round(fuse_boxes(per_template, np.arange(len(per_template))).agreement, 4)
            entry["sub_boxes_lps"] = [entry["box_lps"]]
            entry["sub_boxes_ijk"] = [entry["box_ijk"]]
            if self.mode == "spl":
                entry["note"] = "the registration localizer gives one box per structure (WPL)"
        return {
            "image": str(volume.meta.get("path", volume.name)),
            "mode": self.mode,
            "templates": [str(t.directory) for t in self.templates],
            "localizer": self.describe(),
            "device": "cpu",
            "structures": result["structures"],
            "timing_s": {"total_query": round(time.perf_counter() - t0, 3), "templates_setup": round(self.setup_s, 3)},
        }
