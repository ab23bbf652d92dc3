"""One run configuration for every front end: the CLI (local and Dask), the demo, the Slicer
logic and the test scenarios build their localizer and cohort runner from a :class:`RunSettings`,
so that defaults and option names are defined here once.

A new option goes into the spec it belongs to (:class:`~MedLSAMLib.localizers.LocalizerSpec`,
:class:`SegmenterSpec` or :class:`~MedLSAMLib.segment.slices.SegmentOptions`), its CLI flag and
the Slicer panel; nothing else wires it. Everything here is picklable (the Dask executor ships it
to the workers).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Union

from .errors import InputError
from .localizers import LocalizerSpec
from .segment import check_runtime
from .segment.backends import check_segmenter_args, load_segmenter
from .segment.slices import SegmentOptions


@dataclass(frozen=True)
class SegmenterSpec:
    """Which promptable segmenter: ``litemedsam`` (weights shipped) or SAM / MedSAM ViT-B with a
    user-given checkpoint; ``runtime``: the image encoder's runtime on CPU."""

    name: str = "litemedsam"
    checkpoint: str | None = None
    runtime: str = "auto"

    def __post_init__(self):
        check_segmenter_args(self.name, self.checkpoint)
        check_runtime(self.runtime)

    def load(self, device="cpu"):
        return load_segmenter(self.name, self.checkpoint, device, self.runtime)


#: A segmenter spec, or any picklable callable ``device -> segmenter`` (tests, custom models).
SegmenterChoice = Union[SegmenterSpec, Callable]


def load_segmenter_choice(choice: SegmenterChoice, device="cpu"):
    return choice.load(device) if isinstance(choice, SegmenterSpec) else choice(str(device))


class LazySegmenter:
    """A segmenter loaded at its first use. With the default options every structure's mask is
    carried from the templates (label maps or masks made from six points) and no slice is
    encoded, so a run loads no model at all; one that needs SAM loads it then, once."""

    def __init__(self, choice: SegmenterChoice, device="cpu"):
        self.choice, self.device = choice, device
        self._model = None

    @property
    def loaded(self):
        """The segmenter, loaded now if it was not."""
        if self._model is None:
            self._model = load_segmenter_choice(self.choice, self.device)
        return self._model

    def embed(self, images):
        return self.loaded.embed(images)

    def decode(self, embedding, boxes, shape):
        return self.loaded.decode(embedding, boxes, shape)

    def describe(self) -> dict:
        """The model's own description once loaded; before, what was chosen (nothing ran)."""
        if self._model is not None:
            return self._model.describe()
        name = self.choice.name if isinstance(self.choice, SegmenterSpec) else getattr(self.choice, "__name__", "custom")
        return {"name": name, "loaded": False}


@dataclass
class RunSettings:
    """Templates, localizer, segmenter, device and segmentation options of one run."""

    templates: tuple[str, ...]
    localizer: LocalizerSpec = field(default_factory=LocalizerSpec)
    segmenter: SegmenterChoice = field(default_factory=SegmenterSpec)
    options: SegmentOptions = field(default_factory=SegmentOptions)

    def __post_init__(self):
        self.templates = tuple(str(t) for t in self.templates)
        if not self.templates:
            raise InputError("give at least one template folder")

    def to_json(self) -> dict:
        """Plain JSON (for a run in another process: MedLSAMLib.worker). Only a SegmenterSpec
        travels; a segmenter object or factory cannot."""
        if not isinstance(self.segmenter, SegmenterSpec):
            raise InputError("a custom segmenter object cannot run in another process; use a SegmenterSpec")
        return {"templates": list(self.templates), "localizer": asdict(self.localizer),
                "segmenter": asdict(self.segmenter), "options": asdict(self.options)}

    @classmethod
    def from_json(cls, d: dict) -> "RunSettings":
        return cls(tuple(d["templates"]), LocalizerSpec(**d["localizer"]), SegmenterSpec(**d["segmenter"]),
                   SegmentOptions(**d["options"]))

    def build_localizer(self, support=None, device: str | None = None):
        """The ready localizer (templates prepared, or read from the template cache)."""
        return self.localizer.build(list(self.templates), support=support, device=device)

    def build(self, support=None, segmenter=None):
        """The ready :class:`~MedLSAMLib.pipeline.CohortSegmenter`; ``segmenter``: an already
        loaded one to reuse (the Slicer logic keeps models between runs)."""
        from .pipeline import CohortSegmenter

        localizer = self.build_localizer(support)
        if segmenter is None:
            # a user's checkpoint is loaded (and so checked) before the batch starts; the shipped
            # LiteMedSAM only when some structure has no carried mask
            carried = getattr(localizer, "gives_priors", False) and self.options.prior_weight >= 1.0
            lazy = carried and isinstance(self.segmenter, SegmenterSpec) and self.segmenter.checkpoint is None
            segmenter = (LazySegmenter if lazy else load_segmenter_choice)(self.segmenter, localizer.device)
        return CohortSegmenter(localizer, segmenter, self.options)

    def client_support(self):
        """What a Dask client computes once for every worker: MedLAM's support features (CPU), or
        nothing (the hybrid localizer's template preparation is cached on disk by each worker)."""
        if self.localizer.resolved_kind != "medlam":
            return None
        return self.build_localizer(device="cpu").support.to("cpu")
