"""A decode step's new keys and values written among each row's generated tokens, K and V in one launch (two
index_put kernels otherwise, ~3 us each an S layer at batch 1 on the H100). The plain-torch reference;
kv_append_triton.py is the one launch.

Shapes: gen_k, gen_v [T, H, D] (one layer's generated-token slots), at [B] int64 (each row's slot), k, v [B, H, D]
in gen_k's dtype.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from .dispatch import pick


def append_kv(
    gen_k: torch.Tensor, gen_v: torch.Tensor, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    gen_k[at] = k
    gen_v[at] = v


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "kv_append_triton", sys.modules[__name__])
