"""SamplingParams (SGLang names) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..errors import InvalidRequestError


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
    seed: int | None = None

    @classmethod
    def from_any(cls, params: "SamplingParams | dict | None") -> "SamplingParams":
        """Validated params from a dict (unknown keys are an error) or a SamplingParams."""
        if params is None:
            params = {}
        if isinstance(params, SamplingParams):
            params = {f.name: getattr(params, f.name) for f in fields(cls)}
        if not isinstance(params, dict):
            raise InvalidRequestError("sampling_params must be an object")
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s): {', '.join(sorted(unknown))}"
            )
        sp = cls(**{k: v for k, v in params.items() if v is not None})
        sp.validate()
        return sp

    def validate(self) -> None:
        def number(name, kind=(int, float)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise InvalidRequestError(f"{name} must be a number, got {v!r}")
            return v

        if number("max_new_tokens", int) < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
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
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise InvalidRequestError("stop_token_ids must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos must be a boolean")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequestError("seed must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` [B, vocab] (float32). Greedy rows take the argmax; others temperature,
    top-k, top-p and min-p filtering, then a draw from the row's own generator (so a seed reproduces)."""
    out = logits.argmax(dim=-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
        if p.top_p < 1:
            sorted_p, idx = probs.sort(descending=True)
            drop = (
                sorted_p.cumsum(0) - sorted_p > p.top_p
            )  # keep the smallest prefix whose mass reaches top_p
            probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0))
        out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out
