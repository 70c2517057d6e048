"""Chunk sizing to a step-time budget, as Sarathi-Serve sizes chunks to an inter-token latency target.

A step that carries decoding requests is one gap in their token streams, so the prompt tokens it also computes are
held to `budget_s` for the whole step. The cost model of a step:

    seconds = decode_s + fixed_s + rate x sum over its prompt chunks of flops(new, prefix)
    flops(new, prefix) = new x linear + waves(new) x pair x (prefix + (new + 1) / 2)

`linear`: the model's GEMM flops per token; `pair`: attention's flops per (query, key) pair over all layers, so a
late chunk of a long prompt, which attends to everything before it, costs what its attention costs. Both come from
the model's shape.

On a GPU the attention kernel computes a chunk's queries in tiles of QUERY_TILE tokens per query head, one tile an
SM at a time, so its time steps up with whole waves of tiles: `new` in the attention term is the tokens those waves
could hold. On the H100 (132 SMs, 32 heads: a wave every 528 tokens, first at 512) full's chunks of 1,025-1,140
tokens after a 120k prefix took 0.22-0.23 s and those of 985-1,019 tokens 0.17 s, in three runs, and the same steps
down at 1,536 and 2,048; against the step times of those runs the waves leave 3.4 ms of error (rms) where the
smooth line leaves 11.

`decode_s` is the median of the recent decode-only steps; a step that prefills beside decoding rows in less time
bounds it (on the H100 a server's first decode-only step, which captured graphs, was the only one before six 128k
prompts arrived at once: with it the budget left each step the minimum chunk, 256 tokens in ~80 ms, for 2,540
steps). `fixed_s` (what a step that prefills costs whatever its rows: tailor reads a cached document's rows once per
step, ~0.1 s for 64k tokens, so a later turn's step takes 106 ms for 1 row and 171 ms for 16) and `rate` (seconds
per flop) are measured as the engine runs: a Theil-Sen line through the recent prefill steps (the median of the
pairwise slopes, the median residual as the fixed part), robust to a step that also captured a CUDA graph or
compiled a kernel. Where the steps' flops are too alike to tell the two apart, the fixed part is 0 and the rate the
median of seconds per flop.

Steps sized to the budget all do about the same work, so the line's slope can rest on one unlike step: on the H100
one slow small chunk left a line with a 0.1 s fixed part and a quarter of the true rate, which sized the next chunk
of a long prompt at 8,184 tokens (0.40 s, predicted 0.18). So a step's prompt work grows at most GROWTH times past
the most a recent step did within the budget: a wrong line costs a step at most a quarter more.

A step that opens a request's prefill beside decoding rows may cost more than its flops say (on the H100 tailor's
first chunk of a 126k prompt beside 8 users took 17-37 ms more than predicted in three runs, its later chunks
less): the median excess of the recent such steps over the line (`opening_s`, at least 0, at most OPENING of the
budget: one such step that also compiled something must not starve the next) is left out of the budget of the next
one. Nothing is tuned per device. Until a prefill step has been timed, or when no request decodes, chunks are not
limited (the chunked_prefill_size cap still holds).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

QUERY_TILE = 128  # query tokens a FlashInfer prefill tile holds (per query head) at head_dim 128
MIN_CHUNK = 256  # tokens a prompt advances per step at least: it never stalls behind the decoders
# chunked_prefill_size's defaults: a 64k prompt alone re-reads its prefix in 8 chunks, not 32 (tailor's turn 1 of
# doc chat took 1.10x whole-prompt prefill at 2048 on the H200), as SGLang's default on 80+ GB GPUs
CUDA_CHUNK, CPU_CHUNK = 8192, 2048
STEP_BUDGET_MS = 200.0  # the default on CUDA: inter-token gaps of decoding users stay near 0.2 s while prompts prefill
RECENT = 9  # prefill steps the line is fitted through
SPREAD = 1.5  # two steps give a slope when one's flops are this many times the other's
OPENING = 0.25  # the share of the budget a step's opening cost may take at most
# a step's prompt flops, at most, against the most a recent step did within the budget
GROWTH = 1.25


class StepCost:
    def __init__(self, budget_s: float, linear: float, pair: float, heads: int = 0, sms: int = 0):
        """`heads` query heads of a layer (a rank's) and `sms` of the GPU; 0: attention's time is smooth in the
        tokens (a CPU)."""
        self.budget_s, self.linear, self.pair = budget_s, linear, pair
        self.heads, self.sms = heads, sms
        # seconds of the recent decode-only steps
        self._decode: deque[float] = deque(maxlen=RECENT)
        # (flops, seconds) of the recent prefill steps; the flops of those that took at most the budget
        self._steps: deque[tuple[float, float]] = deque(maxlen=RECENT)
        self._within: deque[float] = deque(maxlen=RECENT)
        # seconds over the line of the recent steps that opened a request's prefill beside decoding rows
        self._opening: deque[float] = deque(maxlen=RECENT)

    @classmethod
    def for_model(cls, cfg, budget_s: float, sms: int = 0, tp_size: int = 1) -> StepCost:
        """From a ModelConfig: 2 flops per weight of the layers' GEMMs; QK and PV at 2 flops each per pair. `sms`:
        the GPU's streaming multiprocessors (0 off the GPU); each of `tp_size` ranks runs its share of the heads."""
        h, d, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        per_layer = h * (q + 2 * kv) * d + q * d * h + 3 * h * cfg.intermediate_size
        return cls(
            budget_s,
            2.0 * cfg.num_layers * per_layer,
            4.0 * cfg.num_layers * q * d,
            q // tp_size,
            sms,
        )

    def fit(self) -> tuple[float, float] | None:
        """(fixed_s, rate) from the recent prefill steps, None before one has been timed."""
        steps = list(self._steps)
        if not steps:
            return None
        slopes = [
            (o2 - o1) / (f2 - f1)
            for i, (f1, o1) in enumerate(steps)
            for f2, o2 in steps[i + 1 :]
            if max(f1, f2) >= SPREAD * min(f1, f2)
        ]
        rate = statistics.median(slopes) if slopes else 0.0
        if rate <= 0:
            return 0.0, statistics.median(o / f for f, o in steps)
        return max(statistics.median(o - rate * f for f, o in steps), 0.0), rate

    @property
    def decode_s(self) -> float | None:
        """Seconds of a decode-only step: the median of the recent ones (None before one)."""
        return statistics.median(self._decode) if self._decode else None

    @property
    def rate(self) -> float | None:
        """Seconds per flop of prompt work, None before a prefill step has been timed."""
        fit = self.fit()
        return fit and fit[1]

    @property
    def fixed_s(self) -> float:
        """Seconds a step that prefills costs beyond its flops."""
        fit = self.fit()
        return fit[0] if fit else 0.0

    def describe(self) -> dict:
        """The model as fitted so far (GET /get_server_info): ms and prompt TFLOP/s, None until measured."""
        fit = self.fit()
        return {
            "budget_ms": self.budget_s * 1e3,
            "decode_ms": None if self.decode_s is None else self.decode_s * 1e3,
            "fixed_ms": fit and fit[0] * 1e3,
            "opening_ms": self.opening_s * 1e3,
            "tflops": fit and 1e-12 / fit[1],
        }

    def waves(self, new: int) -> int:
        """Waves of query tiles the attention kernel runs for `new` tokens (0 off the GPU)."""
        return -(-self.heads * -(-new // QUERY_TILE) // self.sms) if self.sms else 0

    def _most(self, waves: int) -> int:
        """The most tokens `waves` waves hold."""
        return waves * self.sms // self.heads * QUERY_TILE

    def flops(self, new: int, prefix: int) -> float:
        return new * self.linear + self._attended(new) * self.pair * (prefix + (new + 1) / 2)

    def _attended(self, new: int) -> float:
        """Query tokens whose attention time `new` tokens take: whole waves' worth on the GPU."""
        return self._wave_tokens(self.waves(new)) if self.sms else new

    def _wave_tokens(self, waves: int) -> float:
        """Query tokens `waves` waves of tiles compute (a partial tile's share counted)."""
        return waves * self.sms * QUERY_TILE / self.heads

    @property
    def opening_s(self) -> float:
        """Seconds a step that opens a request's prefill beside decoding rows costs over the line (at least 0)."""
        if not self._opening:
            return 0.0
        return min(max(statistics.median(self._opening), 0.0), OPENING * self.budget_s)

    def observe(
        self, chunks: list[tuple[int, int]], decoding: int, seconds: float, opens: bool = False
    ) -> None:
        """A step ran in `seconds`: its prompt chunks (new tokens, tokens before them) and decoding rows; `opens`:
        one of the chunks was a request's first."""
        if not chunks:
            if decoding:
                self._decode.append(seconds)
            return
        if decoding and self._decode and seconds < self.decode_s:
            # its decode rows took less than the whole step: the decode-only steps timed were slow ones (a graph
            # captured, a kernel compiled) and none has run since, the step bounds them
            self._decode.clear()
            self._decode.append(seconds)
        own = seconds - (self.decode_s or 0.0 if decoding else 0.0)
        flops = sum(self.flops(n, p) for n, p in chunks)
        if opens and decoding and (fit := self.fit()):
            self._opening.append(own - fit[0] - fit[1] * flops)
        if own > 0:
            self._steps.append((flops, own))
        if seconds <= self.budget_s:
            self._within.append(flops)

    def allowance(self, decoding: bool) -> float:
        """Flops of prompt work a step may do: unlimited without decoding rows, a budget or a measured rate."""
        fit = self.fit()
        if not decoding or not self.budget_s or fit is None:
            return math.inf
        fixed_s, rate = fit
        line = max(self.budget_s - (self.decode_s or 0.0) - fixed_s, 0.0) / rate
        return min(line, GROWTH * max(self._within)) if self._within else line

    def opening_flops(self) -> float:
        """Flops of prompt work that opening_s is worth at the fitted rate (0 before a fit)."""
        fit = self.fit()
        return self.opening_s / fit[1] if fit and fit[1] > 0 else 0.0

    def tokens_within(self, flops: float, prefix: int) -> int:
        """The most new tokens after `prefix` whose flops fit in `flops`: the root of a quadratic, then on the GPU
        down a wave at a time (within w waves the attention term is fixed, the rest linear in the tokens)."""
        if math.isinf(flops):
            return 1 << 62
        a, b = self.pair / 2, self.linear + self.pair * (prefix + 0.5)
        n = int((2 * flops) / (b + math.sqrt(b * b + 4 * a * flops))) if flops > 0 else 0
        if not self.sms:
            return n
        w = self.waves(n)
        while w:
            attended = self._wave_tokens(w)
            fits = (flops - attended * self.pair * (prefix + 0.5)) / (
                self.linear + attended * self.pair / 2
            )
            m = min(n, self._most(w), math.floor(fits))
            if m > self._most(w - 1):
                return m
            w -= 1
        return 0
