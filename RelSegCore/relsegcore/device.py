"""Device selection: GPU when present, CPU always, forcing allowed."""

from __future__ import annotations

import contextlib
import logging

import torch

from .errors import RelSegError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RelSegError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu or auto.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise RelSegError(f"Unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}.")


def describe_device(device: torch.device) -> str:
    """Human-readable device name for reports and the Slicer panel."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def is_cuda_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(error)


def autocast(device: torch.device, allow_float16: bool = False):
    """Mixed precision on CUDA: bf16 where the GPU has it; float16 only if allowed (inference:
    training in float16 would need gradient scaling); full precision on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16) if allow_float16 else contextlib.nullcontext()
