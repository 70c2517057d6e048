"""Layer identification (TailorKV Eq. 6-9, normalised as in the official code): the dense preference score of a
layer is the mean attention mass that falls outside the top 5% of keys, over the last 32 prompt queries and all
query heads. Layers scoring above tau (0.2) are quantization-friendly.

We apply the causal mask to those 32 queries; the official code omits it, which lets each of them see up to 31
later tokens. With long calibration prompts the difference is small (31 of thousands of keys)."""

from __future__ import annotations

import torch

from .budget import TARGET, WINDOW
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


def tokens_for_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    n: int,
    target: float,
    sink: int,
    recent: int,
    last_q: int = 32,
) -> float:
    """q [N, Hq, D] (post-RoPE), k [N, Hkv, D] of a prompt; of its first n tokens: the mean over the last `last_q`
    queries and the KV heads of the fewest middle tokens (outside the first `sink` and last `recent`) whose
    attention mass, added to the window's, reaches `target` (group-mean attention of each KV head)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    m = min(last_q, n)
    qs = q[n - m : n].float().transpose(0, 1)  # [Hq, m, D]
    ks = k[:n].float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
    logits = qs @ ks.transpose(1, 2) / d**0.5
    pos = torch.arange(n)
    logits = logits.masked_fill(pos > torch.arange(n - m, n).unsqueeze(1), float("-inf"))
    probs = logits.softmax(-1).reshape(hkv, hq // hkv, m, n).mean(1)  # [Hkv, m, n]
    window = (pos < sink) | (pos >= n - recent)
    need = target - probs[..., window].sum(-1)  # [Hkv, m]
    mid = probs[..., ~window].sort(-1, descending=True).values.cumsum(-1)
    count = (mid < need.unsqueeze(-1)).sum(-1) + 1  # the token that crosses the target counts
    count = torch.where(need > 0, count.clamp(max=mid.shape[-1]), 0)
    return float(count.float().mean())


def plan_from_scores(scores: list[float], tau: float) -> list[int]:
    return [i for i, s in enumerate(scores) if s > tau]


class CalibrationProbe(FullPolicy):
    """The full policy, recording each layer's dense preference score during a single-prompt prefill."""

    name = "calibration-probe"

    def __init__(self, cfg, device, dtype, contexts=(), target=TARGET, window=WINDOW):
        super().__init__(cfg, device, dtype)
        self.scores = [0.0] * cfg.num_layers
        self.budget = dict(contexts=list(contexts), target=target, sink=window[0], recent=window[1])
        self.tokens = [[0.0] * len(contexts) for _ in range(cfg.num_layers)]  # [layer][context]

    def attend(self, layer, q, k, v, step: FullStep) -> torch.Tensor:
        qc, kc = q.cpu(), k.cpu()
        self.scores[layer] = dense_preference_score(qc, kc)
        b = self.budget
        for i, n in enumerate(b["contexts"]):
            self.tokens[layer][i] = tokens_for_mass(qc, kc, n, b["target"], b["sink"], b["recent"])
        return super().attend(layer, q, k, v, step)
