"""Layer identification (TailorKV Eq. 6-9, normalised as in the official code): the dense preference score of a
layer is the mean attention mass that falls outside the top 5% of keys, over the last 32 prompt queries and all
query heads. Layers scoring above tau (0.2) are quantization-friendly.

We apply the causal mask to those 32 queries; the official code omits it, which lets each of them see up to 31
later tokens. With long calibration prompts the difference is small (31 of thousands of keys)."""

from __future__ import annotations

import torch

from .budget import TARGET, WINDOW
from .full import FullPolicy, FullStep


def last_query_attention(
    q: torch.Tensor, k: torch.Tensor, n: int, last_q: int = 32
) -> torch.Tensor:
    """q [N, Hq, D] (post-RoPE), k [N, Hkv, D] of a prompt -> the causal attention [Hq, m, n] of the last
    m = min(last_q, n) of its first n queries over its first n keys (GQA: each query head over its KV head)."""
    hq, d = q.shape[1], q.shape[2]
    m = min(last_q, n)
    qs = q[n - m : n].float().transpose(0, 1)  # [Hq, m, D]
    ks = k[:n].float().repeat_interleave(hq // k.shape[1], dim=1).transpose(0, 1)  # [Hq, n, D]
    logits = qs @ ks.transpose(1, 2) / d**0.5
    logits = logits.masked_fill(
        torch.arange(n) > torch.arange(n - m, n).unsqueeze(1), float("-inf")
    )
    return logits.softmax(-1)


def dense_preference_score(
    q: torch.Tensor, k: torch.Tensor, last_q: int = 32, top_frac: float = 0.05
) -> float:
    """q [n, Hq, D] (post-RoPE), k [n, Hkv, D] of one prompt -> mean mass outside the top max(1, 5%) keys."""
    n = q.shape[0]
    probs = last_query_attention(q, k, n, last_q)
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
    hq, hkv = q.shape[1], k.shape[1]
    probs = last_query_attention(q, k, n, last_q)
    probs = probs.reshape(hkv, hq // hkv, probs.shape[1], n).mean(1)  # [Hkv, m, n]
    pos = torch.arange(n)
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
