"""The affine-atlas baseline (``--localizer registration``): SimpleITK affine per template, points
mapped, per-coordinate median. Kept as a reference arm and for users who want plain atlas
registration; the hybrid localizer is faster and more accurate (docs/results.md)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..geometry import box_from_extreme_points, box_from_points, box_lps_to_ijk
from ..io import Volume, read_ct
from .affine_registration import map_template_points
from ..results import Localization, StructureResult
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

    def localize(self, image: str | Path | Volume) -> Localization:
        t0 = time.perf_counter()
        volume = image if isinstance(image, Volume) else read_ct(image)
        mapped = [map_template_points(t, img, volume, self.structures) for t, img in zip(self.templates, self.images)]
        structures = {}
        for name in self.structures:
            points = np.median(np.stack([m[name] for m in mapped]), axis=0)
            box = box_from_extreme_points(points, strict=False)
            box_lps, box_ijk = box.round(3).tolist(), box_lps_to_ijk(box, volume.geometry).tolist()
            per_template = np.stack([box_from_points(m[name]) for m in mapped])
            structures[name] = StructureResult(
                label=self.templates[0].structures[name].label, present=True,  # no presence model
                confidence=round(fuse_boxes(per_template, np.arange(len(per_template))).agreement, 4),
                box_lps=box_lps, box_ijk=box_ijk, sub_boxes_lps=[box_lps], sub_boxes_ijk=[box_ijk],
                extreme_points_lps=points.round(3).tolist(),
                note="the registration localizer gives one box per structure (WPL)" if self.mode == "spl" else None)
        return Localization(
            image=str(volume.meta.get("path", volume.name)), mode=self.mode,
            templates=[str(t.directory) for t in self.templates], localizer=self.describe(), device="cpu",
            structures=structures,
            timing_s={"total_query": round(time.perf_counter() - t0, 3), "templates_setup": round(self.setup_s, 3)})
