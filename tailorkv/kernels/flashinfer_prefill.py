"""FlashInfer's single-sequence prefill attention with its log-sum-exp, which lets partial results merge (GPU only,
imported lazily): GQA without expanding K/V heads, the causal mask aligned to the last query. attention.py holds
the torch reference with the same signature and picks this module on CUDA."""
from __future__ import annotations

import math

import torch


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                  sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as attention.attention_lse."""
    import flashinfer

    out, lse = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=causal, sm_scale=sm_scale, return_lse=True)
    return out, lse * math.log(2)  # FlashInfer's log-sum-exp is base 2
