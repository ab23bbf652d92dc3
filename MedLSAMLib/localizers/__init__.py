"""Localizers: templates + a query CT -> one box (and shape) per structure.

Every localizer has the same surface: ``templates``, ``structures``, ``device``, ``setup_s``,
``describe()`` and ``localize(image) -> dict`` (the ``boxes.json`` layout). Choose one with
:class:`LocalizerSpec` (picklable: the Dask executor ships it to workers):

* ``hybrid``: coarse-to-fine template alignment (global affine, per-structure local affine,
  robust fusion). The most accurate here (docs/results.md).
* ``medlam``: the MedLAM network (shipped lite checkpoint, the authors' ``medlam.pth`` or one you
  trained); fastest per query on a GPU.
* ``registration``: the plain affine-atlas baseline (SimpleITK), kept as a reference arm.
* ``auto``: the most accurate on our measurements, i.e. ``hybrid``; ``medlam`` when a MedLAM
  checkpoint is given (giving one says which localizer you want).
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("auto", "hybrid", "medlam", "registration")
#: What ``auto`` means: the most accurate localizer on the dev benchmark (docs/results.md).
AUTO_KIND = "hybrid"


@dataclass(frozen=True)
class LocalizerSpec:
    """Which localizer, with which options; ``build`` is the one way to get a ready localizer."""

    kind: str = "auto"
    mode: str = "wpl"
    medlam_checkpoint: str | None = None
    device: str = "auto"
    cache_dir: str | None = ""  # "" = the default cache folder, None = no template cache

    def __post_init__(self):
        from ..errors import InputError

        if self.kind not in KINDS:
            raise InputError(f"unknown localizer {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.medlam_checkpoint and self.resolved_kind != "medlam":
            raise InputError(f"--medlam-checkpoint is for --localizer medlam, not {self.kind}")
        if self.mode not in ("wpl", "spl"):
            raise InputError(f"unknown mode {self.mode!r}; use wpl or spl")

    @property
    def resolved_kind(self) -> str:
        if self.kind == "auto":
            return "medlam" if self.medlam_checkpoint else AUTO_KIND
        return self.kind

    def build(self, template_dirs, structures: list[str] | None = None, support=None, device: str | None = None):
        from ..errors import InputError
        from ..device import resolve_device

        dev = resolve_device(device or self.device)
        kind = self.resolved_kind
        if support is not None and kind != "medlam":
            raise InputError(f"precomputed support features are MedLAM's, not the {kind} localizer's")
        if kind == "medlam":
            from .medlam import MedLAMLocalizer

            return MedLAMLocalizer(template_dirs, mode=self.mode, checkpoint=self.medlam_checkpoint, device=str(dev),
                                     structures=structures, support=support)
        if kind == "hybrid":
            from .hybrid import HybridLocalizer

            return HybridLocalizer(template_dirs, mode=self.mode, device=dev, structures=structures,
                                   cache_dir=True if self.cache_dir == "" else self.cache_dir)
        from .registration import RegistrationLocalizer

        return RegistrationLocalizer(template_dirs, mode=self.mode, structures=structures)
