"""SamplingParams (SGLang names) and the batched sampler.

`sample` picks one token per row of a step's logits: a row's logits processors first (the hook for penalties,
logit bias, grammar masks), then greedy rows by argmax, sampled rows without a seed in one batched draw from
the engine's generator, and seeded rows one by one from their own generator (so a seed reproduces whatever
else is in the batch). A temperature below SAMPLING_EPS is greedy; a row whose processed numbers are still
unusable (NaN, all -inf) takes the argmax of its raw logits instead of failing the batch. Log-probabilities are of the raw
logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Protocol

import torch

from ..config import InputLimits
from ..errors import InvalidRequestError
from ..memory.host_memory import to_device
from .sampling_checks import validate_extras

# a temperature below this samples greedily (vLLM's and SGLang's rule): logits / 1e-40 overflow float32
SAMPLING_EPS = 1e-5
SEED_BOUND = 2**63  # seeds must fit torch.Generator.manual_seed as a signed 64-bit integer
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")
# compile time grows with a grammar's size (engine/grammar.py has the timeout)


def check_text(value: str, what: str) -> None:
    """A client's text must be valid Unicode: a lone surrogate ("\\ud800" in JSON) has no UTF-8 form."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid Unicode (a lone surrogate)") from None


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # None: drawn with the batch from the engine's generator
    # structured output (at most one): a JSON schema as JSON text, a regex, an EBNF grammar (engine/grammar.py)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    min_new_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    frequency_penalty: float = 0.0  # minus this times the token's count in the output (OpenAI)
    presence_penalty: float = 0.0  # minus this once the token is in the output (OpenAI)
    repetition_penalty: float = (
        1.0  # prompt and output tokens' logits divided by it (> 0) or times it (HF)
    )
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (JSON keys: "123")
    n: int = 1  # completions per prompt (each its own request, sampled independently)
    skip_special_tokens: bool = True  # in the output text
    spaces_between_special_tokens: bool = True  # only True: fast tokenizers put no spaces there
    no_stop_trim: bool = False  # keep a matched stop string (or stop_regex match) in the text
    stop_regex: list[str] = field(default_factory=list)  # stop at a match ending in the new text

    @classmethod
    def from_any(
        cls, params: "SamplingParams | dict | None", limits: InputLimits = InputLimits()
    ) -> "SamplingParams":
        """Validated params from a dict (unknown keys are an error unless null) or a SamplingParams, within
        `limits`."""
        if params is None:
            params = {}
        if isinstance(params, SamplingParams):
            params = {f.name: getattr(params, f.name) for f in fields(cls)}
        if not isinstance(params, dict):
            raise InvalidRequestError("sampling_params must be an object")
        known = {f.name for f in fields(cls)}
        unknown = {k for k, v in params.items() if v is not None} - known  # null: the default
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s): {', '.join(sorted(unknown))}"
            )
        sp = cls(**{k: v for k, v in params.items() if v is not None})
        sp.validate(limits)
        return sp

    def validate(self, limits: InputLimits = InputLimits()) -> None:
        def number(name, kind=(int, float)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise InvalidRequestError(f"{name} must be a number, got {v!r}")
            return v

        if number("max_new_tokens", int) < 0:  # 0: prefill only (prompt logprobs, caching a prefix)
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("temperature", "top_p", "min_p"):
            if not math.isfinite(number(name)):
                raise InvalidRequestError(
                    f"{name} must be a finite number, got {getattr(self, name)}"
                )
        if not number("temperature") >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if number("top_k", int) == 0 or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= number("min_p") <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(
                "stop must be a non-empty string or a list of non-empty strings"
            )
        if len(self.stop) > limits.stop_strings or any(
            len(s) > limits.stop_chars for s in self.stop
        ):
            raise InvalidRequestError(
                f"stop takes at most {limits.stop_strings} strings of at most {limits.stop_chars} "
                "characters"
            )
        for s in self.stop:
            check_text(s, "a stop string")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise InvalidRequestError("stop_token_ids must be a list of non-negative integers")
        if len(self.stop_token_ids) > limits.stop_token_ids:
            raise InvalidRequestError(f"stop_token_ids takes at most {limits.stop_token_ids} ids")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos must be a boolean")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequestError("seed must be an integer")
        if self.seed is not None and not 0 <= self.seed < SEED_BOUND:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}")
        validate_extras(self, limits)
        self._validate_grammar(limits.grammar_chars)

    def _validate_grammar(self, max_chars: int) -> None:
        given = [k for k in GRAMMAR_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise InvalidRequestError(f"give at most one of {', '.join(given)}")
        for kind in given:
            text = getattr(self, kind)
            if not isinstance(text, str) or not text:
                raise InvalidRequestError(f"{kind} must be a non-empty string")
            if len(text) > max_chars:
                raise InvalidRequestError(
                    f"{kind} has {len(text)} characters; at most {max_chars} are accepted"
                )
            check_text(text, kind)

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint, if any."""
        return next(((k, getattr(self, k)) for k in GRAMMAR_KINDS if getattr(self, k)), None)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


# a row's logits [vocab] -> new logits [vocab]
LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]


class SamplerRow(Protocol):
    """What the sampler reads of a request (Request has it)."""

    params: SamplingParams
    generator: torch.Generator | None  # a seeded row's own; None: drawn with the batch
    logits_processors: list[LogitsProcessor]
    # None: no logprobs; 0: the chosen token's; n: and the n most likely
    top_logprobs_num: int | None

    @property
    def forced_token(self) -> int | None:
        """Teacher forcing: the token to take instead of a sample."""


class Sample(NamedTuple):
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first


class Drawn(NamedTuple):
    """A step's samples, on the device until `to_host`: each row's token, and for the rows in `want` (with their
    top_n) the chosen token's logprob [m] and the top n logprobs and tokens [m, n]."""

    tokens: torch.Tensor
    want: list[int]
    top_n: list[int]
    picked: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None

    def to_host(self) -> Drawn:
        """Copies in pinned memory (on CUDA without waiting: they are complete once the stream gets there)."""
        if not self.tokens.is_cuda:
            return self

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        return Drawn(copy(self.tokens), self.want, self.top_n, *map(copy, self[3:]))

    def samples(self) -> list[Sample]:
        """The rows' Samples (host copies read: call once the copies are complete)."""
        out = [Sample(t) for t in self.tokens.tolist()]
        if not self.want:
            return out
        picked = self.picked.tolist()
        top = self.top_values is not None and _pairs(self.top_indices, self.top_values)
        for j, (i, m) in enumerate(zip(self.want, self.top_n)):
            out[i] = Sample(out[i].token, picked[j], top[j][:m] if m else None)
        return out


def sample(
    logits: torch.Tensor,
    rows: list[SamplerRow],
    generator: torch.Generator,
    processed_logprobs: bool = False,
) -> list[Sample]:
    """One token per row of `logits` [B, vocab] (float32). Rows without a seed draw from `generator` in one
    batch, so their tokens depend on the batch they are in; a seeded row's tokens do not. Logprobs are those of
    the raw logits, or with `processed_logprobs` of the logits after the processors and the temperature (vLLM's
    logprobs modes)."""
    return draw(logits, rows, generator, processed_logprobs).samples()


def draw(
    logits: torch.Tensor,
    rows: list[SamplerRow],
    generator: torch.Generator,
    processed_logprobs: bool = False,
) -> Drawn:
    """`sample`'s tokens and logprobs, left on the device: nothing here waits for the device (the overlap
    schedule hands the tokens to the next step before the host reads them)."""
    raw_best = logits.argmax(dim=-1)
    x, tokens = logits, raw_best.clone()
    if any(r.logits_processors for r in rows):
        x = logits.clone()
        for i, r in enumerate(rows):
            for fn in r.logits_processors:
                x[i] = fn(x[i])
        unusable = x.isnan().any(-1) | (x.amax(-1) == float("-inf"))
        tokens = torch.where(unusable, raw_best, x.argmax(dim=-1))
    forced = [r.forced_token for r in rows]
    _draw_rows(x, rows, raw_best, tokens, generator, forced)
    at = [i for i, f in enumerate(forced) if f is not None]
    if at:
        tokens[on_device(at, x)] = on_device([forced[i] for i in at], x)
    if processed_logprobs:
        scale = [1.0 if r.params.greedy else r.params.temperature for r in rows]
        logits = x / on_device(scale, x, x.dtype)[:, None]
    want = [i for i, r in enumerate(rows) if r.top_logprobs_num is not None]
    top_n = [rows[i].top_logprobs_num for i in want]
    if not want:
        return Drawn(tokens, want, top_n)
    index = on_device(want, x)
    return Drawn(tokens, want, top_n, *_logprobs(logits[index], tokens[index], max(top_n)))


def _draw_rows(
    x: torch.Tensor,
    rows: list[SamplerRow],
    raw_best: torch.Tensor,
    tokens: torch.Tensor,
    generator: torch.Generator,
    forced: list[int | None],
) -> None:
    """Into `tokens`, each row that samples (not greedy, not forced): seeded rows with their own generator, the
    others in one batch from `generator`; `raw_best` is what a row whose distribution is unusable takes."""
    drawn = [i for i, r in enumerate(rows) if forced[i] is None and not r.params.greedy]
    seeded = [i for i in drawn if rows[i].generator is not None]
    batch = [i for i in drawn if rows[i].generator is None]
    for i in seeded:
        tokens[i] = _draw(_filtered_probs(x[i], rows[i].params), raw_best[i], rows[i].generator)
    if batch:
        index = on_device(batch, x)
        tokens[index] = _draw_batch(
            x[index], [rows[i].params for i in batch], raw_best[index], generator
        )


def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """A seeded row's distribution: temperature, top-k, softmax, min-p, top-p (this op order is what its seed
    reproduces)."""
    row = row / p.temperature
    if p.top_k > 0:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
    if p.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0))
    return probs


def _usable(probs: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` [..., vocab]: finite, non-negative and with some mass."""
    return probs.isfinite().all(-1) & (probs >= 0).all(-1) & (probs.sum(-1) > 0)


def _draw(probs: torch.Tensor, fallback: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    ok = _usable(probs)
    token = torch.multinomial(torch.where(ok, probs, 1.0), 1, generator=gen)[0]
    return torch.where(ok, token, fallback)


def _draw_batch(
    x: torch.Tensor, params: list[SamplingParams], fallback: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Temperature, top-k, softmax, min-p and top-p over all rows at once (in each row's sorted order when a
    row asks for top-k or top-p), then one draw."""

    def col(values) -> torch.Tensor:
        return on_device(values, x, x.dtype)[:, None]

    x = x / col([p.temperature for p in params])
    idx = None
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        x, idx = x.sort(dim=-1, descending=True)
        k = col([p.top_k if p.top_k > 0 else x.shape[-1] for p in params])
        x = x.masked_fill(torch.arange(x.shape[-1], device=x.device) >= k, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    probs = probs.masked_fill(probs < col([p.min_p for p in params]) * probs.amax(-1, True), 0)
    if idx is not None:
        drop = probs.cumsum(-1) - probs > col(
            [p.top_p if p.top_p < 1 else float("inf") for p in params]
        )
        probs = probs.masked_fill(drop, 0)
    ok = _usable(probs)
    token = torch.multinomial(torch.where(ok[:, None], probs, 1.0), 1, generator=gen)[:, 0]
    if idx is not None:
        token = idx.gather(-1, token[:, None])[:, 0]
    return torch.where(ok, token, fallback)


def token_logprobs(
    logits: torch.Tensor, targets: list[int], top_n: int
) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Per row of `logits` [m, vocab]: the log-softmax of its target token, and (top_n > 0) its top_n (token,
    logprob) pairs, most likely first. One host copy for all rows."""
    picked, values, indices = _logprobs(logits, on_device(targets, logits), top_n)
    return picked.tolist(), None if values is None else _pairs(indices, values)


def _pairs(indices: torch.Tensor, values: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per row, its (token, logprob) pairs in order: one host copy of each tensor."""
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def on_device(values: list, like: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small list as a tensor on `like`'s device, copied without waiting for the stream (a plain
    torch.tensor(..., device=cuda) waits for every step queued before it)."""
    return to_device(torch.tensor(values, dtype=dtype), like.device)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, top_n: int) -> tuple:
    """On the device: (the targets' log-softmax [m], and with top_n the top_n logprobs and tokens [m, top_n])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, targets[:, None])[:, 0]
    if not top_n:
        return picked, None, None
    top = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
    return picked, top.values, top.indices
