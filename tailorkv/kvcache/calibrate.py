"""Layer identification (TailorKV Eq. 6-9, normalised as in the official code): the dense preference score of a
layer is the mean attention mass that falls outside the top 5% of keys, over the last 32 prompt queries and all
query heads. Layers scoring above tau (0.2) are quantization-friendly.

We apply the causal mask to those 32 queries; the official code omits it, which lets each of them see up to 31
later tokens. With long calibration prompts the difference is small (31 of thousands of keys)."""

from __future__ import annotations

import torch

from .full import FullPolicy, FullStep


def dense_preference_score(
    q: torch.Tensor, k: torch.Tensor, last_q: int = 32, top_frac: float = 0.05, causal: bool = True
) -> float:
    """q [n, Hq, D] (post-RoPE), k [n, Hkv, D] of one prompt -> mean mass outside the top max(1, 5%) keys."""
    n, hq, d = q.shape
    m = min(last_q, n)
    qs = q[n - m :].float().transpose(0, 1)  # [Hq, m, D]
    ks = k.float().repeat_interleave(hq // k.shape[1], dim=1).transpose(0, 1)  # [Hq, n, D]
    logits = qs @ ks.transpose(1, 2) / d**0.5  # [Hq, m, n]
    if causal:
        pos = torch.arange(n - m, n).unsqueeze(1)
        logits = logits.masked_fill(torch.arange(n).unsqueeze(0) > pos, float("-inf"))
    probs = logits.softmax(-1)
    top = probs.topk(max(1, int(top_frac * n)), dim=-1).values.sum(-1)
    return float((1 - top).mean())


def plan_from_scores(scores: list[float], tau: float) -> list[int]:
    return [i for i, s in enumerate(scores) if s > tau]


class CalibrationProbe(FullPolicy):
    """The full policy, recording each layer's dense preference score during a single-prompt prefill."""

    name = "calibration-probe"

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        self.scores = [0.0] * cfg.num_layers

    def attend(self, layer, q, k, v, step: FullStep) -> torch.Tensor:
        self.scores[layer] = dense_preference_score(q.cpu(), k.cpu())
        return super().attend(layer, q, k, v, step)
