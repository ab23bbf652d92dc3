"""CPU inference runtimes for the segmenter's image encoder.

torch is the reference path, and the only one for CUDA and for SAM / MedSAM ViT-B. On CPU the
LiteMedSAM image encoder (the expensive half: one call per encoded slice) runs on OpenVINO: it
is converted once from the torch module, saved as OpenVINO IR in a cache folder whose name
carries the SHA256 of the source weights and the OpenVINO version (``source.json`` beside it
records both), and compiled at load in full float32. A missing or damaged cache is rebuilt.
Why OpenVINO, and how close it is to torch on real slices: docs/results.md.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

RUNTIMES = ("auto", "torch", "openvino")
CACHE_FORMAT = 1


def model_cache_dir() -> Path:
    """Where converted models live: ``$MEDLSAM_CACHE/models`` (default ``~/.cache/medlsam/models``)."""
    return Path(os.environ.get("MEDLSAM_CACHE") or Path.home() / ".cache" / "medlsam") / "models"


def resolve_runtime(runtime: str, device: str | torch.device, convertible: bool) -> str:
    """``auto``: OpenVINO for a convertible model on CPU when the package is installed, else torch."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose {', '.join(RUNTIMES)}")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "openvino":
        if not on_cpu:
            raise InputError("--runtime openvino runs on the CPU; use --device cpu or --runtime torch")
        if not convertible:
            raise InputError("--runtime openvino is available for LiteMedSAM only; use --runtime torch")
        if not _openvino_installed():
            raise InputError("--runtime openvino needs the 'openvino' package (pip install openvino)")
        return "openvino"
    if runtime == "auto":
        return "openvino" if (on_cpu and convertible and _openvino_installed()) else "torch"
    return "torch"


def _openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINOEncoder:
    """The image encoder as a compiled OpenVINO model: a float32 torch tensor in, one out.

    The IR has a fixed batch of one (TinyViT's reshapes are traced with a constant batch), and
    one slice at a time is also the fastest way through it on a few cores (docs/results.md)."""

    def __init__(self, compiled, folder: Path):
        self._compiled = compiled
        self.folder = folder

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.concatenate([np.asarray(self._compiled(batch[n:n + 1])[0]) for n in range(len(batch))]))


def openvino_encoder(module: torch.nn.Module, input_size: int, name: str, source_sha256: str,
                     cache_dir: Path | None = None, threads: int | None = None) -> OpenVINOEncoder:
    """Compile ``module`` (``[N, 3, S, S]`` -> embeddings) with OpenVINO, converting it on the
    first call for these weights and reading the cached IR afterwards."""
    import openvino as ov

    root = Path(cache_dir) if cache_dir else model_cache_dir()
    folder = root / f"{name}-encoder-{source_sha256[:16]}-openvino-{ov.__version__}"
    source = {"model": name, "part": "image_encoder", "source_sha256": source_sha256, "input_size": input_size,
              "openvino": ov.__version__, "format": CACHE_FORMAT}
    core = ov.Core()
    model = _read_cached(core, folder, source)
    if model is None:
        model = _convert_and_save(module, input_size, folder, source)
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return OpenVINOEncoder(core.compile_model(model, "CPU", config), folder)


def _read_cached(core, folder: Path, source: dict):
    try:
        if json.loads((folder / "source.json").read_text(encoding="utf-8")) != source:
            return None
        return core.read_model(str(folder / "encoder.xml"))
    except (OSError, ValueError, RuntimeError):
        return None  # missing or damaged: rebuilt, never trusted


def _convert_and_save(module: torch.nn.Module, input_size: int, folder: Path, source: dict):
    import openvino as ov

    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        model = ov.convert_model(module.eval(), example_input=example)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ov.save_model(model, str(tmp / "encoder.xml"), compress_to_fp16=False)
        (tmp / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache only costs the conversion next time
    return model
