"""Linear layers on CPU through oneDNN, each weight packed once (torch's mkldnn ops, as Inductor's CPU freezing runs
them). MKL's sgemm reads a weight once per row of a small batch: at 3 rows the embedded model's LM head took 44 ms
against oneDNN's 15, its SwiGLU projection 2.9 ms against 1.2 (one core, float32); at 1 row both read it once. A
row's output is also the same bits whatever rows share its batch."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Linear):
    """nn.Linear (its weight kept: other code reads it) that multiplies by a oneDNN-packed copy of that weight."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> None:
    """Every nn.Linear of a float32 CPU model becomes a PackedLinear, where torch has oneDNN; again: nothing."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            if module.weight.dtype == torch.float32:
                module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
                module.__class__ = PackedLinear
