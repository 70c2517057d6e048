"""Which implementation of a kernel module runs: the Triton one on CUDA when triton imports, else the torch
reference (same functions, same signatures)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 off CUDA): a wave of thread blocks."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick(device: torch.device | str, triton_module: str, reference: ModuleType) -> ModuleType:
    if torch.device(device).type == "cuda":
        try:
            return importlib.import_module(f"tailorkv.kernels.{triton_module}")
        except ImportError:
            pass
    return reference
