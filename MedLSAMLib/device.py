"""Which device and how many CPU threads: decided here only, for the CLI, training, the Dask
workers, the Slicer panel and the Segment Editor effect. torch is imported lazily so that the
Slicer module can ask before its dependencies are installed."""
from __future__ import annotations

import importlib.util
import os

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA GPU."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str = "auto"):
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a one-line error."""
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available")
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    return torch.device(name)


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware: containers and batch jobs often get fewer)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def set_cpu_threads(threads: int | None = None) -> None:
    """torch on CPU uses ``threads`` (default: every usable core; torch's own default can be lower
    inside containers)."""
    import torch

    torch.set_num_threads(max(1, threads or usable_cores()))
