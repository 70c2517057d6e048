"""BudgetPlan: how many dominant prompt tokens (top_k) each S layer fetches per decode step, as a function of the
request's context, fitted per layer to calibration measurements (calibrate.tokens_for_mass) and capped.

Per layer the fit is a share of the context (k = a n) or a power law (k = a n^b), whichever has the smaller
relative squared error over the measured contexts; k(n) = min(cap, ceil(fit(n))) never decreases with n, so the
k of the longest context in a batch bounds every row's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

TARGET = 0.975  # attention mass the window and the top-k tokens carry (benchmarks/NOTES.md, "Calibrated budget")
MAX_TOP_K = 2048  # latency bound: rows one S layer fetches per step at most
WINDOW = (64, 64)  # sink, recent of the `auto` preset (the ruler preset's)


@dataclass(frozen=True)
class LayerFit:
    kind: str  # "share" (k = a n) or "power" (k = a n^b)
    a: float
    b: float = 1.0

    def at(self, n: int) -> float:
        return self.a * n if self.kind == "share" else self.a * n**self.b


def fit_layer(contexts: list[int], tokens: list[float]) -> LayerFit:
    """A share of the context, unless a power law (least squares in log space, b >= 0) through (contexts, tokens)
    has less than half its relative squared error, and by more than 0.01 (the simpler fit wins near-ties)."""
    pts = [(n, max(t, 0.5)) for n, t in zip(contexts, tokens)]  # a layer needing none: half a token
    share = LayerFit("share", sum(t for _, t in pts) / sum(n for n, _ in pts))
    if len({n for n, _ in pts}) < 2:
        return share
    xs, ys = [math.log(n) for n, _ in pts], [math.log(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    power = LayerFit("power", math.exp(my - b * mx), b)

    def error(f: LayerFit) -> float:
        return sum((f.at(n) / t - 1) ** 2 for n, t in pts)

    e_share, e_power = error(share), error(power)
    return power if b >= 0 and e_power < min(e_share / 2, e_share - 0.01) else share


@dataclass
class BudgetPlan:
    target: float
    sink: int
    recent: int
    cap: int
    contexts: list[int]
    tokens: list[list[float]]  # [layer][context]: measured middle tokens for the target mass
    fits: list[LayerFit] = field(default_factory=list)  # per layer

    @classmethod
    def fit(cls, contexts, tokens, target=TARGET, window=WINDOW, cap=MAX_TOP_K) -> BudgetPlan:
        fits = [fit_layer(contexts, t) for t in tokens]
        return cls(target, *window, cap, list(contexts), tokens, fits)

    def top_k(self, layer: int, context: int) -> int:
        """Tokens layer `layer` fetches per step for a request of `context` prompt tokens."""
        return max(0, min(self.cap, math.ceil(round(self.fits[layer].at(context), 6))))

    def mean_budget(self, layers: list[int], context: int) -> float:
        """Prompt tokens an S layer attends to per step, averaged over `layers` (window included)."""
        ks = [
            min(self.top_k(i, context), max(context - self.sink - self.recent, 0)) for i in layers
        ]
        return min(self.sink + self.recent, context) + sum(ks) / max(len(ks), 1)

    def as_json(self) -> dict:
        return {**asdict(self), "fits": [asdict(f) for f in self.fits]}

    @classmethod
    def from_json(cls, d: dict) -> BudgetPlan:
        return cls(**{**d, "fits": [LayerFit(**f) for f in d["fits"]]})
