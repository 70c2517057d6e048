"""Decode-time baselines behind the same interface, for side-by-side accuracy and speed:

- `offload`: every layer's whole KV in the host tier, all of it brought back every step (HF OffloadedCache,
  FlexGen-style).
- `streaming`: StreamingLLM, attention over `sink` first tokens + the most recent tokens.
- `quest`: Quest, pages of 16 tokens with per-channel min/max keys; each decode step keeps the pages with the
  highest upper bound of q.k per KV head (plus the current page).
Prefill is exact in all of them; streaming and quest get the same token budget as tailor (its preset's
sink + recent + top_k, or `budget=`). These are reference implementations: they keep the full paged KV and
narrow what a decode step reads, so their accuracy is the method's, not their memory.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..kernels.attention import grouped_attention
from .batch import ForwardBatch
from .full import PAGE_SIZE, FullPolicy
from .tailor_config import TailorConfig


class OffloadPolicy(FullPolicy):
    name = "offload"
    tier = "host"


class _BudgetPolicy(FullPolicy):
    def __init__(self, cfg, device, dtype, tailor_preset: str | None = None, budget: int | None = None,
                 sink: int | None = None):
        super().__init__(cfg, device, dtype)
        tc = TailorConfig.from_options(tailor_preset)
        self.budget = tc.budget if budget is None else budget
        self.sink = tc.sink if sink is None else sink
        if not isinstance(self.budget, int) or self.budget < 1 or not 0 <= self.sink < self.budget:
            raise ConfigError(f"{self.name}: need budget >= 1 and 0 <= sink < budget, got {self.budget}, {self.sink}")


class StreamingPolicy(_BudgetPolicy):
    name = "streaming"

    def read_positions(self, i: int, batch: ForwardBatch) -> torch.Tensor:
        n = batch.total_len(i)
        if batch.start[i] == 0 or n <= self.budget:
            return torch.arange(n)
        return torch.cat([torch.arange(self.sink), torch.arange(n - (self.budget - self.sink), n)])


class QuestPolicy(_BudgetPolicy):
    name = "quest"

    def decode(self, layer, i, q, keys, values, batch: ForwardBatch) -> torch.Tensor:
        n, h, d = keys.shape
        pages = -(-n // PAGE_SIZE)
        keep = min(pages, max(1, self.budget // PAGE_SIZE))
        kp = torch.nn.functional.pad(keys.float(), (0, 0, 0, 0, 0, pages * PAGE_SIZE - n), value=float("nan"))
        kp = kp.view(pages, PAGE_SIZE, h, d)
        kmin, kmax = kp.nan_to_num(float("inf")).amin(1), kp.nan_to_num(float("-inf")).amax(1)  # [P, H, D]
        qg = q[0].float().view(h, -1, d)  # [H, g, D]
        bound = torch.maximum(qg.unsqueeze(0) * kmin.unsqueeze(2), qg.unsqueeze(0) * kmax.unsqueeze(2)).sum(-1)
        bound = bound.amax(-1)  # [P, H]: the group's best upper bound
        bound[-1] = float("inf")  # the current page is always read
        top = bound.topk(keep, dim=0).indices.T  # [H, keep]
        tok = (top.unsqueeze(-1) * PAGE_SIZE + torch.arange(PAGE_SIZE, device=top.device)).reshape(h, -1)
        valid = tok < n  # the last page is partial
        tok = tok.clamp(max=n - 1)
        heads = torch.arange(h, device=tok.device).unsqueeze(1)
        return grouped_attention(q[0], keys[tok, heads], values[tok, heads], mask=valid).unsqueeze(0)
