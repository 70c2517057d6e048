"""Stage 1 from the real query (the key-sketch path): per row and KV head, the d_s channels with the largest Eq. 10
score |mean over the GQA group of q| * max_t |K| (largest first, ties to the lower channel), and the group mean of
q on them (what sketch_scores takes). The plain-torch reference; channel_select_triton.py does it in one launch,
where a step ran an index of max_abs, a fused elementwise kernel, torch.topk's two kernels and a gather per S
layer (~15 us of them at batch 1 on the H100, `latency_b1_128k_blocks_h100_20261206c`).

Shapes: q [B, Hq, D] (any float dtype), max_abs [slots, Hkv, D] float32, slots [B] int64 (each row's entry of
max_abs), d_s <= D. Returns (channels [B, Hkv, d_s] int64, qc [B, Hkv, d_s] float32).
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from .dispatch import pick


def select_channels(
    q: torch.Tensor, max_abs: torch.Tensor, slots: torch.Tensor, d_s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h = q.shape[0], max_abs.shape[-2]
    mean = q.float().reshape(b, h, -1, q.shape[-1]).sum(-2) / (q.shape[1] // h)
    scores = mean.abs() * max_abs[slots].float()
    channels = scores.sort(dim=-1, descending=True, stable=True).indices[..., :d_s]
    return channels, mean.gather(-1, channels)


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "channel_select_triton", sys.modules[__name__])
