"""Stage 2's top-k as positions: per row, the k_r largest scores among positions [begin, end), returned in position
order. The plain-torch reference; token_topk_triton.py finds the same set by radix select (four histogram passes
over the 8-bit digits of the scores' order-preserving integer keys, then a count and a write pass), without
torch.topk's radix passes and sort.

Shapes: scores [B, H, L] float32 (H KV heads); begin, end: 0-d or [B] int64; k: the slots (k' = min(k, L));
k_rows: [B] int64, each row's own k (at most k'), or None (k' for every row). Returns (positions [B, H, k'] int64,
valid [B, H, k'] bool): slot j < k_r holds the j-th smallest selected position, valid where its score is finite
and inside [begin, end); later slots hold position 0, not valid. Positions outside [begin, end) count as -inf, as
torch.topk of the masked scores would see them. Ties at the k_r-th score take the lowest positions first (-0.0
counts as 0.0), so the set is exact and deterministic.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from .dispatch import pick


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = scores.shape[-1]
    kk = min(k, n)
    pos = torch.arange(n, device=scores.device)
    row = (-1, 1, 1)  # 0-d or [B] -> broadcast over heads and positions
    outside = (pos < begin.view(row)) | (pos >= end.view(row))
    masked = scores.float().masked_fill(outside, float("-inf"))
    slots = torch.ones(1, 1, kk, dtype=torch.bool, device=scores.device)
    if k_rows is not None:
        krh = k_rows.view(row).clamp(max=kk)
        slots = slots & (torch.arange(kk, device=scores.device) < krh)
    else:
        krh = torch.full((1, 1, 1), kk, device=scores.device)
    values, top = masked.topk(kk, dim=-1)
    kth = values.gather(-1, (krh - 1).clamp(min=0).expand(*masked.shape[:2], 1))
    tied = masked == kth
    if (tied.sum(-1, keepdim=True) > ((values == kth) & slots).sum(-1, keepdim=True)).any():
        # a tie across the k_r-th place: the lowest tied positions, where torch.topk may take others
        need = krh - (masked > kth).sum(-1, keepdim=True)
        chosen = (masked > kth) | (tied & (tied.cumsum(-1) <= need))
        top = torch.where(chosen, pos, n).sort(-1).values[..., :kk]
    slots = slots.expand_as(top)
    positions = torch.where(slots, top, n).sort(-1).values.masked_fill_(~slots, 0)
    valid = slots & (masked.gather(-1, positions) > float("-inf"))
    return positions, valid


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "token_topk_triton", sys.modules[__name__])
