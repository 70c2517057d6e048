"""Which implementation of a kernel module runs: the Triton one on CUDA when triton imports, else the torch
reference (same functions, same signatures)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def pick(device: torch.device | str, triton_module: str, reference: ModuleType) -> ModuleType:
    if torch.device(device).type == "cuda":
        try:
            return importlib.import_module(f"tailorkv.kernels.{triton_module}")
        except ImportError:
            pass
    return reference
