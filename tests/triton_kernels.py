"""What every kernel test shares: the Triton versions run compiled on CUDA, else in the Triton interpreter on CPU.
Import this before any kernel module: the interpreter flag is read when the kernels are decorated."""
import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if CUDA else "cpu"


def triton_module(name: str):
    """`tailorkv.kernels.<name>` (skipped without triton); without CUDA decorated again, since another test module
    may have loaded it before the interpreter flag was set."""
    mod = pytest.importorskip(f"tailorkv.kernels.{name}")
    return mod if CUDA else importlib.reload(mod)
