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


def _row_values(x: torch.Tensor | None, b: int, default: int, device) -> torch.Tensor:
    """0-d, [B] (any strides) or None -> a contiguous [B] int64 (what the Triton kernels index by row)."""
    if x is None:
        return torch.full((b,), default, dtype=torch.int64, device=device)
    return torch.as_tensor(x, device=device).to(torch.int64).expand(b).contiguous()


def row_bounds(scores, begin, end, k, k_rows):
    """(k', begin [B], end [B], k_r [B]) of top_positions' arguments, shared with the Triton wrapper."""
    b, _, n = scores.shape
    kk = min(k, n)
    kr = _row_values(k_rows, b, kk, scores.device).clamp(0, kk)
    begin, end = (_row_values(x, b, 0, scores.device) for x in (begin, end))
    return kk, begin, end, kr


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kk, begin, end, kr = row_bounds(scores, begin, end, k, k_rows)
    n = scores.shape[-1]
    pos = torch.arange(n, device=scores.device)
    inside = (pos >= begin[:, None, None]) & (pos < end[:, None, None])
    masked = torch.where(inside, scores.float(), float("-inf")) + 0.0  # -0.0 -> 0.0
    krh = kr[:, None, None]
    kth = masked.topk(kk, dim=-1).values.gather(
        -1, (krh - 1).clamp(min=0).expand(*masked.shape[:2], 1)
    )
    above, tied = masked > kth, masked == kth
    need = krh - above.sum(-1, keepdim=True)
    chosen = (above | (tied & (tied.cumsum(-1) <= need))) & (krh > 0)
    ordered = torch.where(chosen, pos, n).sort(-1).values[..., :kk]
    slots = torch.arange(kk, device=scores.device) < krh
    positions = torch.where(slots, ordered, 0)
    valid = slots & (masked.gather(-1, positions) > float("-inf"))
    return positions, valid


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "token_topk_triton", sys.modules[__name__])
