"""Slice-wise promptable segmentation: backends (LiteMedSAM, SAM / MedSAM ViT-B), encoder runtimes
and the volume loop. This file stays light (no torch) so that front ends can read the choices."""
from ..errors import InputError

SEGMENTERS = ("litemedsam", "sam-vit-b", "medsam-vit-b")
#: Image-encoder runtimes (segment/runtimes.py): auto = ONNX Runtime for LiteMedSAM on CPU, else torch.
RUNTIMES = ("auto", "torch", "onnxruntime")


def check_runtime(runtime: str) -> None:
    """One message for an unknown runtime name, wherever it is given (settings, load_segmenter)."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
