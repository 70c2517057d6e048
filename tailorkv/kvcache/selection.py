"""TailorKV's two-stage retrieval as pure functions (the reference the GPU kernels are tested against).

Stage 1 ranks key channels per KV head by |mean over the GQA group of q̂| * max_t |K| (Eq. 10) and keeps d_s.
Stage 2 scores prompt tokens with the real query's group mean on those channels (raw dot product, no softmax)
and keeps the top k per KV head among positions [begin, end) — never sink, recent or generated tokens.
Every function takes optional leading batch dims (one per sequence).
"""

from __future__ import annotations

import torch


def group_mean(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Hq, D] -> [..., Hkv, D]: the mean over each KV head's group of query heads."""
    return q.float().reshape(*q.shape[:-2], num_kv_heads, -1, q.shape[-1]).mean(-2)


def select_channels(q_hat: torch.Tensor, max_abs_k: torch.Tensor, d_s: int) -> torch.Tensor:
    """q_hat [..., Hq, D] (predicted query), max_abs_k [..., Hkv, D] -> channel ids [..., Hkv, d_s]."""
    score = group_mean(q_hat, max_abs_k.shape[-2]).abs() * max_abs_k.float()
    return score.topk(d_s, dim=-1).indices


def score_tokens(q: torch.Tensor, k_channels: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """q [..., Hq, D], k_channels [..., Hkv, d_s, L] (the chosen channels of K), channels [..., Hkv, d_s]
    -> scores [..., Hkv, L]."""
    qc = group_mean(q, channels.shape[-2]).gather(-1, channels)
    return torch.einsum("...hc,...hcl->...hl", qc, k_channels.float())


def select_tokens(
    scores: torch.Tensor, begin, end, k: int, k_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top min(k, L) scores per KV head among positions [begin, end) (ints, or tensors [...] per sequence):
    (positions [..., Hkv, k'], valid [..., Hkv, k']); a slot is invalid when the range holds fewer than k', or its
    rank is k_rows [...] (a sequence's own k <= k) or more: then the valid slots are that sequence's top k_rows."""
    pos = torch.arange(scores.shape[-1], device=scores.device)
    begin, end = (
        torch.as_tensor(begin, device=scores.device),
        torch.as_tensor(end, device=scores.device),
    )
    inside = (
        (pos >= begin[..., None, None]) & (pos < end[..., None, None])
        if begin.dim()
        else (pos >= begin) & (pos < end)
    )
    top = scores.masked_fill(~inside, float("-inf")).topk(min(k, scores.shape[-1]), dim=-1)
    valid = top.values > float("-inf")
    if k_rows is not None:
        valid &= torch.arange(valid.shape[-1], device=valid.device) < k_rows[..., None, None]
    return top.indices, valid
