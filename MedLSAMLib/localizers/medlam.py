"""MedLAM localization as a user runs it: templates + a query CT -> a Localization (boxes.json).

Shared by ``medlsam localize``, the segmentation pipeline and the Slicer logic.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..device import resolve_device
from ..errors import InputError
from ..io import Volume, read_ct
from ..medlam.checkpoint import DEFAULT_CHECKPOINT, load_medlam, verify_default_checkpoint
from ..medlam.search import LandmarkSearch, SearchOptions, SupportSet, prepare
from ..results import Localization
from ..templates import Template, load_template
from ..weights import sha256


class MedLAMLocalizer:
    """Loads the network and the templates' support features once; localizes any number of CTs.

    ``support`` skips the (slow) support computation when the features were computed already for
    the same templates, structures, mode and checkpoint.
    """

    def __init__(self, template_dirs, *, mode: str = "wpl", checkpoint=None, device: str = "auto",
                 structures: list[str] | None = None, options: SearchOptions | None = None,
                 support: SupportSet | None = None):
        t0 = time.perf_counter()
        self.device = resolve_device(device)
        if checkpoint is None:
            verify_default_checkpoint()
        self.checkpoint = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
        model = load_medlam(self.checkpoint, self.device)  # first: a missing file is a one-line error
        self.checkpoint_sha256 = sha256(self.checkpoint)  # once, not per query
        opts = options or SearchOptions()
        opts.mode = mode
        self.localizer = LandmarkSearch(model, self.device, opts)
        self.templates: list[Template] = [load_template(d) for d in template_dirs]
        if not self.templates:
            raise InputError("give at least one --template")
        self.structures = structures or list(self.templates[0].structures)
        if support is not None:  # computed elsewhere (e.g. once on a Dask client for every worker)
            if list(support.labels) != list(self.structures):
                raise InputError(f"support features are for {list(support.labels)}, not {self.structures}")
            self.support = support.to(self.device)
        else:
            self.support = self.localizer.support(self.templates, self.structures)
        self.setup_s = time.perf_counter() - t0

    kind = "medlam"

    def describe(self) -> dict:
        return {"kind": self.kind, "checkpoint": {"path": str(self.checkpoint), "sha256": self.checkpoint_sha256}}

    def localize(self, image: str | Path | Volume) -> Localization:
        t0 = time.perf_counter()
        volume = image if isinstance(image, Volume) else read_ct(image)
        t_read = time.perf_counter()
        prepared = prepare(volume, self.device)
        t_prep = time.perf_counter()
        result = self.localizer.localize(prepared, self.support)
        timing = {"read": t_read - t0, "preprocess": t_prep - t_read, **result.pop("timing_s"),
                  "templates_setup": self.setup_s}
        timing["total_query"] = time.perf_counter() - t0
        return Localization(
            image=str(volume.meta.get("path", volume.name)), mode=self.localizer.opts.mode,
            templates=[str(t.directory) for t in self.templates],
            checkpoint={"path": str(self.checkpoint), "sha256": self.checkpoint_sha256},
            localizer=self.describe(), device=str(self.device), structures=result["structures"],
            timing_s={k: round(v, 3) for k, v in timing.items()})
