"""MedLAM weight files: our own format (weights + config + frame) and the authors' ``medlam.pth``.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers, so a file cannot run code on load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from ..io import atomic_path
from ..preprocess import MEDLAM_HU_KNOTS, MEDLAM_VALUE_KNOTS
from ..weights import load_weights, sha256
from .network import CONFIGS, MedLAM, MedLAMConfig, strip_data_parallel

FORMAT = "medlsam-medlam"

#: The frame every MedLAM checkpoint is trained in; stored in each file and checked on load.
FRAME = {
    "canonical_axes": ["S", "A", "L"],
    "spacing_mm": 3.0,
    "intensity_hu": list(MEDLAM_HU_KNOTS),
    "intensity_value": list(MEDLAM_VALUE_KNOTS),
    "distance_ratio_mm": [1500.0, 600.0, 600.0],
}

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_CHECKPOINT = MODELS_DIR / "medlam_lite_hn.pt"
SHA256SUMS = MODELS_DIR / "SHA256SUMS"


def verify_default_checkpoint() -> Path:
    """Check the shipped checkpoint against its recorded SHA256 (catches truncated or swapped files)."""
    if not DEFAULT_CHECKPOINT.is_file():
        raise InputError(f"the shipped MedLAM checkpoint is missing ({DEFAULT_CHECKPOINT}); reinstall MedLSAM "
                         "or pass --checkpoint")
    expected = {}
    for line in SHA256SUMS.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            expected[name] = digest
    if expected.get(DEFAULT_CHECKPOINT.name) != sha256(DEFAULT_CHECKPOINT):
        raise InputError(f"{DEFAULT_CHECKPOINT}: SHA256 does not match {SHA256SUMS.name}; the file is damaged")
    return DEFAULT_CHECKPOINT


def save_weights(model: MedLAM, path: str | os.PathLike, info: dict | None = None, half: bool = False) -> None:
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    doc = {"format": FORMAT, "config": model.config.to_dict(), "frame": dict(FRAME),
           "info": info or {}, "state_dict": state}
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def load_medlam(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> MedLAM:
    """Load our checkpoint format or the authors' ``medlam.pth`` (plain DataParallel state dict)."""
    path = Path(path) if path else DEFAULT_CHECKPOINT
    doc = load_weights(path, "MedLAM checkpoint")
    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        frame = doc.get("frame", {})
        if frame.get("canonical_axes") != FRAME["canonical_axes"] or float(frame.get("spacing_mm", 0)) != FRAME["spacing_mm"]:
            raise InputError(f"{path}: trained in an unsupported frame {frame}")
        config = MedLAMConfig.from_dict(doc["config"])
        state = doc["state_dict"]
    elif isinstance(doc, dict) and all(isinstance(v, torch.Tensor) for v in doc.values()):
        config = CONFIGS["reference"]  # the authors' release: a bare state dict
        state = strip_data_parallel(doc)
    else:
        raise InputError(f"{path}: not a MedLAM checkpoint")
    model = MedLAM(config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not match the MedLAM network ({str(exc).splitlines()[0][:160]})") from None
    model.checkpoint_path = str(path)
    model.checkpoint_info = doc.get("info", {}) if isinstance(doc, dict) and "info" in doc else {}
    return model.to(device).eval()
