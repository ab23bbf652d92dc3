"""Reading model weights, which are untrusted input: ``torch.load(weights_only=True)`` only
(tensors and plain containers; a checkpoint that holds code or other objects is refused), with
one-line errors in the user's terms."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import torch

from .errors import InputError


def load_weights(path: str | Path, what: str = "checkpoint"):
    """The object saved in ``path`` (a state dict or a dict of them), never code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals ...
        text = str(exc)
        if "Weights only load failed" in text and zipfile.is_zipfile(path):
            raise InputError(f"{path}: refused: this {what} holds objects other than weights (possibly code), and "
                             "MedLSAM loads weights only; use the original weights file") from None
        raise InputError(f"{path}: not a PyTorch weights file ({what}); check the path, or copy the file again "
                         "if it was cut short") from None


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA256 of a file, read in 1 MiB blocks (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
