"""Linear layers on CPU through oneDNN, each weight packed once (torch's mkldnn ops, as Inductor's CPU freezing runs
them). MKL's sgemm takes about as long per row of a small batch as for one row, as if it read the weight once a
row: the embedded model's linears at 3 rows ran 1.9x faster through oneDNN, at 1 row 0.9x (one core, float32;
benchmarks/results/cpu_linear_20261205.json). A row's output is also the same bits whatever rows share its batch."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Linear):
    """nn.Linear (its weight kept: other code reads it) that multiplies by a oneDNN-packed copy of that weight."""

    packed: torch.Tensor
    # oneDNN takes another kernel for one row at this weight's shape, whose sums round otherwise than a batch's (a
    # gemv on AMD's AVX-512 at 1536 inputs): one row then runs as the first of two, ~10% slower, the batch's bits
    one_row_as_two: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row_as_two and x.numel() == x.shape[-1]:
            two = x.reshape(1, -1).expand(2, -1)
            return self._product(two)[:1].reshape(*x.shape[:-1], -1)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, packed: dict[str, torch.Tensor]) -> None:
    """Every nn.Linear of a float32 CPU model becomes a PackedLinear, where torch has oneDNN; again: nothing.
    `packed`: packed weights by module name, of this model's weights (taken from it, and what is packed added)."""
    if not torch.backends.mkldnn.is_available():
        return
    for name, module in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]:
        w = module.weight
        if w.device.type == "cpu" and w.dtype == torch.float32:
            if name not in packed:
                packed[name] = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            module.packed = packed[name]
            module.__class__ = PackedLinear
            module.one_row_as_two = False
            probe = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                module.one_row_as_two = not torch.equal(module(probe[:1]), module(probe)[:1])
