"""TailorKV's exact attention of one decode query over what an offloaded ("S") layer reads in a step: the sink +
recent window and the generated tokens (both in the GPU tier) and the top-k rows fetched from the host tier. The
plain-torch reference; sparse_attention_triton.py computes the same in one kernel, without gathering the three
sources into one tensor first.

Shapes (B rows, Hq query heads over H KV heads, head_dim D):
- q [B, Hq, D]; window win_k, win_v [slots, W, H, D] read at slots [B], valid where win_mask [B, W];
- generated gen_k, gen_v [N, H, D] read at gen_read [B, G], valid where gen_mask [B, G];
- fetched [B, H, K, 2D] (a token's K then V), or fp8 host rows packed as host_fp8 does (uint8 [B, H, K, 2D + 4],
  dequantized here), valid where valid [B, H, K].
Returns [B, Hq, D] in q's dtype (float32 math). Masked slots may hold anything, NaN included.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from . import host_fp8
from .attention import grouped_attention
from .dispatch import pick


def sparse_decode_attention(
    q: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    slots: torch.Tensor,
    win_mask: torch.Tensor,
    gen_k: torch.Tensor,
    gen_v: torch.Tensor,
    gen_read: torch.Tensor,
    gen_mask: torch.Tensor,
    fetched: torch.Tensor,
    valid: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    h, d = win_k.shape[2], win_k.shape[3]
    if fetched.dtype == torch.uint8:
        fetched = host_fp8.dequantize_rows(fetched, win_k.dtype, win_k.shape[-1])
    keys = torch.cat(
        [win_k[slots], gen_k[gen_read], fetched[..., :d].transpose(1, 2).to(win_k.dtype)], 1
    )
    values = torch.cat(
        [win_v[slots], gen_v[gen_read], fetched[..., d:].transpose(1, 2).to(win_v.dtype)], 1
    )
    mask = torch.cat([torch.cat([win_mask, gen_mask], 1)[:, None].expand(-1, h, -1), valid], 2)
    return grouped_attention(q, keys.transpose(1, 2), values.transpose(1, 2), sm_scale, mask)


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "sparse_attention_triton", sys.modules[__name__])
