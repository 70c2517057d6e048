"""TailorKV's two-stage retrieval as pure functions (the reference the GPU kernels are tested against).

Stage 1 ranks key channels per KV head by |mean over the GQA group of q̂| * max_t |K| (Eq. 10) and keeps d_s.
Stage 2 scores prompt tokens with the real query's group mean on those channels (raw dot product, no softmax)
and keeps the top k per KV head among positions [begin, end) — never sink, recent or generated tokens.
"""
from __future__ import annotations

import torch


def group_mean(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hq, D] -> [Hkv, D]: the mean over each KV head's group of query heads."""
    return q.float().view(num_kv_heads, -1, q.shape[-1]).mean(1)


def select_channels(q_hat: torch.Tensor, max_abs_k: torch.Tensor, d_s: int) -> torch.Tensor:
    """q_hat [Hq, D] (predicted query), max_abs_k [Hkv, D] -> channel ids [Hkv, d_s]."""
    score = group_mean(q_hat, max_abs_k.shape[0]).abs() * max_abs_k.float()
    return score.topk(d_s, dim=-1).indices


def score_tokens(q: torch.Tensor, k_channels: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """q [Hq, D], k_channels [Hkv, d_s, L] (the chosen channels of K), channels [Hkv, d_s] -> scores [Hkv, L]."""
    qc = group_mean(q, channels.shape[0]).gather(1, channels)
    return torch.einsum("hc,hcl->hl", qc, k_channels.float())


def select_tokens(scores: torch.Tensor, begin: int, end: int, k: int) -> torch.Tensor:
    """Positions [Hkv, min(k, end-begin)] of the highest scores within [begin, end), per KV head."""
    k = max(0, min(k, end - begin))
    return scores[:, begin:end].topk(k, dim=-1).indices + begin
