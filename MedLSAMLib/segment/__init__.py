"""Slice-wise promptable segmentation: backends (LiteMedSAM, SAM / MedSAM ViT-B), encoder runtimes
and the volume loop. This file stays light (no torch) so that front ends can read the choices."""

SEGMENTERS = ("litemedsam", "sam-vit-b", "medsam-vit-b")
#: Image-encoder runtimes (segment/runtimes.py): auto = ONNX Runtime for LiteMedSAM on CPU, else torch.
RUNTIMES = ("auto", "torch", "onnxruntime")
