"""What every kernel test shares: the Triton versions run compiled on CUDA, else in the Triton interpreter on CPU
(conftest.py sets the interpreter flag before anything imports triton)."""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def triton_module(name: str):
    """`tailorkv.kernels.<name>`, the test skipped without triton."""
    return pytest.importorskip(f"tailorkv.kernels.{name}")
