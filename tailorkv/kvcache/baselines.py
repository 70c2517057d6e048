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
    reads_everything = False

    def __init__(
        self,
        cfg,
        device,
        dtype,
        tailor_preset: str | None = None,
        budget: int | None = None,
        sink: int | None = None,
    ):
        super().__init__(cfg, device, dtype)
        self.budget, self.sink = self._budget_and_sink(tailor_preset, budget, sink)

    @classmethod
    def validate_options(cls, tailor_preset=None, budget=None, sink=None, **options) -> None:
        super().validate_options(**options)
        cls._budget_and_sink(tailor_preset, budget, sink)

    @classmethod
    def _budget_and_sink(cls, tailor_preset, budget, sink) -> tuple[int, int]:
        """Tokens a decode step reads and how many of them are the first ones (default: tailor's preset's)."""
        if tailor_preset == "auto":
            raise ConfigError(f"{cls.name}: give budget= (auto is tailor's per-layer budget)")
        tc = TailorConfig.from_options(tailor_preset)
        budget = tc.budget if budget is None else budget
        sink = tc.sink if sink is None else sink
        if not isinstance(budget, int) or budget < 1 or not 0 <= sink < budget:
            raise ConfigError(
                f"{cls.name}: need budget >= 1 and 0 <= sink < budget, got {budget}, {sink}"
            )
        return budget, sink


class StreamingPolicy(_BudgetPolicy):
    name = "streaming"

    def read_positions(self, i: int, batch: ForwardBatch) -> torch.Tensor:
        n = batch.total_len(i)
        if not self.is_decode(i, batch) or n <= self.budget:
            return torch.arange(n)
        return torch.cat([torch.arange(self.sink), torch.arange(n - (self.budget - self.sink), n)])


class QuestPolicy(_BudgetPolicy):
    name = "quest"

    def decode(self, q, keys, values, mask) -> torch.Tensor:
        b, h, n, d = keys.shape
        pages = -(-n // PAGE_SIZE)
        keep = min(pages, max(1, self.budget // PAGE_SIZE))
        pad = pages * PAGE_SIZE - n
        kp = torch.nn.functional.pad(keys.float(), (0, 0, 0, pad)).view(b, h, pages, PAGE_SIZE, d)
        valid = torch.nn.functional.pad(mask, (0, pad)).view(b, 1, pages, PAGE_SIZE, 1)
        kmin = kp.masked_fill(~valid, float("inf")).amin(3)  # [B, H, P, D]
        kmax = kp.masked_fill(~valid, float("-inf")).amax(3)
        qg = q.float().view(b, h, 1, -1, d)  # [B, H, 1, g, D]
        bound = (
            torch.maximum(qg * kmin.unsqueeze(3), qg * kmax.unsqueeze(3)).sum(-1).amax(-1)
        )  # [B, H, P]
        used = valid.view(b, pages, PAGE_SIZE).any(-1)  # [B, P]
        last = used.sum(-1) - 1  # each row's current page is always read
        bound = bound.masked_fill(~used[:, None], float("-inf"))
        bound.scatter_(2, last.view(b, 1, 1).expand(b, h, 1), float("inf"))
        top = bound.topk(keep, dim=-1)  # [B, H, keep]
        tok = (
            top.indices.unsqueeze(-1) * PAGE_SIZE + torch.arange(PAGE_SIZE, device=q.device)
        ).view(b, h, -1)
        ok = (top.values > float("-inf")).repeat_interleave(PAGE_SIZE, -1) & (tok < n)
        tok = tok.clamp(max=n - 1)
        ok &= mask.gather(1, tok.view(b, -1)).view(b, h, -1)
        pick = lambda x: x.gather(2, tok.unsqueeze(-1).expand(-1, -1, -1, d))  # noqa: E731
        return grouped_attention(q, pick(keys), pick(values), mask=ok)
