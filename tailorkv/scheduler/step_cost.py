"""Chunk sizing to a step-time budget, as Sarathi-Serve sizes chunks to an inter-token latency target.

A step that carries decoding requests is one gap in their token streams, so the prompt tokens it also computes are
held to `budget_s` for the whole step. The cost model of a step:

    seconds = decode_s + rate x sum over its prompt chunks of flops(new, prefix)
    flops(new, prefix) = new x (linear + pair x (prefix + (new + 1) / 2))

`linear`: the model's GEMM flops per token; `pair`: attention's flops per (query, key) pair over all layers, so a
late chunk of a long prompt, which attends to everything before it, costs what its attention costs. Both come from
the model's shape; `decode_s` (a decode-only step, averaged) and `rate` (seconds per flop: the median over the
recent prefill steps, so that a step that also captured a CUDA graph or compiled a kernel does not count) are
measured as the engine runs: nothing is tuned per device. Until a prefill step has
been timed, or when no request decodes, chunks are not limited (the chunked_prefill_size cap still holds).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

MIN_CHUNK = 256  # tokens a prompt advances per step at least: it never stalls behind the decoders
STEP_BUDGET_MS = 200.0  # the default on CUDA: inter-token gaps of decoding users stay near 0.2 s while prompts prefill
DECAY = 0.8  # weight of the earlier decode-step times against each new one
RECENT = 9  # prefill steps the rate is the median of


class StepCost:
    def __init__(self, budget_s: float, linear: float, pair: float):
        self.budget_s, self.linear, self.pair = budget_s, linear, pair
        self.decode_s: float | None = None
        self._rates: deque[float] = deque(maxlen=RECENT)

    @classmethod
    def for_model(cls, cfg, budget_s: float) -> StepCost:
        """From a ModelConfig: 2 flops per weight of the layers' GEMMs; QK and PV at 2 flops each per pair."""
        h, d, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        per_layer = h * (q + 2 * kv) * d + q * d * h + 3 * h * cfg.intermediate_size
        return cls(budget_s, 2.0 * cfg.num_layers * per_layer, 4.0 * cfg.num_layers * q * d)

    @property
    def rate(self) -> float | None:
        """Seconds per flop of prompt work, None before a prefill step has been timed."""
        return statistics.median(self._rates) if self._rates else None

    def flops(self, new: int, prefix: int) -> float:
        return new * (self.linear + self.pair * (prefix + (new + 1) / 2))

    def observe(self, chunks: list[tuple[int, int]], decoding: int, seconds: float) -> None:
        """A step ran in `seconds`: its prompt chunks (new tokens, tokens before them) and decoding rows."""
        if not chunks:
            if decoding:
                self.decode_s = (
                    seconds
                    if self.decode_s is None
                    else DECAY * self.decode_s + (1 - DECAY) * seconds
                )
            return
        own = seconds - (self.decode_s or 0.0 if decoding else 0.0)
        if own > 0:
            self._rates.append(own / sum(self.flops(n, p) for n, p in chunks))

    def allowance(self, decoding: bool) -> float:
        """Flops of prompt work a step may do: unlimited without decoding rows, a budget or a measured rate."""
        rate = self.rate
        if not decoding or not self.budget_s or rate is None:
            return math.inf
        return max(self.budget_s - (self.decode_s or 0.0), 0.0) / rate

    def tokens_within(self, flops: float, prefix: int) -> int:
        """The most new tokens after `prefix` whose flops fit in `flops` (the root of a quadratic)."""
        if math.isinf(flops):
            return 1 << 62
        a, b = self.pair / 2, self.linear + self.pair * (prefix + 0.5)
        return int((2 * flops) / (b + math.sqrt(b * b + 4 * a * flops))) if flops > 0 else 0
