"""Exact attention references used on CPU (and as the oracle for GPU kernels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                     sm_scale: float | None = None) -> torch.Tensor:
    """q [n, Hq, D] at positions q_start..q_start+n-1 over k, v [L, Hkv, D] at positions 0..L-1 with
    L = q_start + n (GQA by head groups); query i sees keys 0..q_start+i. Returns [n, Hq, D] in q's dtype."""
    n, L = q.shape[0], k.shape[0]
    if q_start + n != L:
        raise ValueError(f"causal_attention: {n} queries from position {q_start} need {q_start + n} keys, got {L}")
    # a chunk after earlier tokens: the causal mask aligned to the bottom right, which SDPA applies in its fused
    # kernels without an [n, L] mask in memory (an explicit mask took 6 GiB at 8k x 128k)
    mask = causal_lower_right(n, L) if q_start else None
    if q.is_cuda and q.shape[1] != k.shape[1]:
        # SDPA's fused CUDA kernels refuse enable_gqa; expanded heads keep it off the O(n^2)-memory math path
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    # 4-D [1, heads, tokens, D]: the fused (flash / memory-efficient) kernels take no 3-D input
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), attn_mask=mask,
                                         is_causal=mask is None, scale=sm_scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, each KV head with its own key set: q [..., Hq, D], k, v [..., Hkv, L, D]
    -> [..., Hq, D] (float32 math; leading dims are sequences). Query head h reads KV head h // (Hq // Hkv);
    keys where `mask` [..., Hkv, L] is False are ignored."""
    hkv, d = k.shape[-3], k.shape[-1]
    qg = q.float().reshape(*q.shape[:-2], hkv, -1, d)
    scores = torch.einsum("...hgd,...hld->...hgl", qg, k.float()) * (sm_scale or d ** -0.5)
    v = v.float()
    if mask is not None:  # masked slots may hold stale memory, NaN included: 0 * NaN would leak into the output
        scores = scores.masked_fill(~mask.unsqueeze(-2), float("-inf"))
        v = v.masked_fill(~mask.unsqueeze(-1), 0.0)
    out = torch.einsum("...hgl,...hld->...hgd", scores.softmax(-1), v)
    return out.reshape(q.shape).to(q.dtype)
