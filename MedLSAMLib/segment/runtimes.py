"""CPU inference runtime for the segmenter's image encoder.

torch is the reference path, and the only one for CUDA and for SAM / MedSAM ViT-B. On CPU the
LiteMedSAM image encoder (the expensive half: one call per encoded slice) runs on ONNX Runtime:
exported once from the torch module (``torch.onnx``), saved in a cache folder whose name carries
the SHA256 of the source weights and the ONNX Runtime version (``source.json`` beside the model
records both), and loaded as an inference session afterwards. A missing or damaged cache is
rebuilt. ONNX Runtime against torch and OpenVINO on the same real slices (speed, first-use setup,
agreement): docs/results.md.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from . import check_runtime  # with RUNTIMES in the light package file, read by front ends without torch

CACHE_FORMAT = 1


def model_cache_dir() -> Path:
    """Where exported models live: ``$MEDLSAM_CACHE/models`` (default ``~/.cache/medlsam/models``)."""
    return Path(os.environ.get("MEDLSAM_CACHE") or Path.home() / ".cache" / "medlsam") / "models"


def resolve_runtime(runtime: str, device: str | torch.device, exportable: bool) -> str:
    """``auto``: ONNX Runtime for an exportable model on CPU when it is installed, else torch."""
    check_runtime(runtime)
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "onnxruntime":
        if not on_cpu:
            raise InputError("--runtime onnxruntime runs on the CPU; use --device cpu or --runtime torch")
        if not exportable:
            raise InputError("--runtime onnxruntime is available for LiteMedSAM only; use --runtime torch")
        if not _installed():
            raise InputError("--runtime onnxruntime needs the 'onnxruntime' and 'onnx' packages "
                             "(pip install onnxruntime onnx)")
        return "onnxruntime"
    if runtime == "auto":
        return "onnxruntime" if (on_cpu and exportable and _installed()) else "torch"
    return "torch"


def _installed() -> bool:
    """ONNX Runtime, and onnx for torch's exporter."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


class OnnxEncoder:
    """The image encoder as an ONNX Runtime session: a float32 torch tensor in, one out.

    The exported graph has a batch of one (TinyViT's reshapes are traced with a constant batch),
    and one slice at a time is also the fastest way through it on a few cores (docs/results.md)."""

    def __init__(self, session, folder: Path):
        self._session = session
        self._input = session.get_inputs()[0].name
        self.folder = folder

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.concatenate([self._session.run(None, {self._input: batch[n:n + 1]})[0]
                                                for n in range(len(batch))]))


def onnx_encoder(module: torch.nn.Module, input_size: int, name: str, source_sha256: str,
                 cache_dir: Path | None = None, threads: int | None = None) -> OnnxEncoder:
    """An ONNX Runtime session for ``module`` (``[1, 3, S, S]`` -> embedding), exporting it on the
    first call for these weights and reading the cached model afterwards."""
    import onnxruntime as ort

    root = Path(cache_dir) if cache_dir else model_cache_dir()
    folder = root / f"{name}-encoder-{source_sha256[:16]}-onnxruntime-{ort.__version__}"
    source = {"model": name, "part": "image_encoder", "source_sha256": source_sha256, "input_size": input_size,
              "torch": torch.__version__, "onnxruntime": ort.__version__, "format": CACHE_FORMAT}
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = _cached_session(ort, folder, source, options)
    if session is None:
        path = _export(module, input_size, folder, source)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return OnnxEncoder(session, folder)


def _cached_session(ort, folder: Path, source: dict, options):
    try:
        if json.loads((folder / "source.json").read_text(encoding="utf-8")) != source:
            return None
        return ort.InferenceSession(str(folder / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  missing or damaged (ORT raises its own types): rebuilt, never trusted
        return None


def _export(module: torch.nn.Module, input_size: int, folder: Path, source: dict) -> Path:
    """Export into a temporary folder, then move it in place (atomic for readers); the model path.
    An unwritable cache folder only costs the export again next time."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="medlsam-onnx-"))
        folder = None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about TinyViT's shape asserts
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, input_size, input_size),), str(tmp / "encoder.onnx"),
                          input_names=["image"], output_names=["embedding"], dynamo=False)
    (tmp / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    if folder is None:
        return tmp / "encoder.onnx"
    try:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        return tmp / "encoder.onnx"
    return folder / "encoder.onnx"
