"""The logits processors a request's sampling params ask for (the sampler's processor stage, `sample`): penalties
on repeated tokens, min_new_tokens, logit bias. Each keeps its state on the logits' device and updates it with
the tokens produced since its last call, so a step costs O(new tokens), not O(output)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import LogitsProcessor, SamplingParams, on_device


class Penalties:
    """OpenAI's frequency and presence penalties over the output tokens, HF's repetition penalty over the prompt
    and output tokens."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], output_ids: list[int]):
        self.p, self.prompt_ids, self.output_ids = params, prompt_ids, output_ids
        self.counts: torch.Tensor | None = None  # [vocab] each token's count in the output
        self.seen: torch.Tensor | None = None  # [vocab] in the prompt or the output
        self.done = 0  # output tokens counted

    def __call__(self, row: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            self.counts = torch.zeros(row.shape[-1], dtype=row.dtype, device=row.device)
            self.seen = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
            self.seen[on_device(list(self.prompt_ids), row)] = True
        new = self.output_ids[self.done :]
        if new:
            index = on_device(new, row)
            self.counts.index_add_(
                0, index, torch.ones(len(new), dtype=row.dtype, device=row.device)
            )
            self.seen[index] = True
            self.done = len(self.output_ids)
        p = self.p
        if p.repetition_penalty != 1:
            scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(self.seen, scaled, row)
        if p.frequency_penalty:
            row = row - p.frequency_penalty * self.counts
        if p.presence_penalty:
            row = row - p.presence_penalty * (self.counts > 0).to(row.dtype)
        return row


class MinNewTokens:
    """-inf on the ids that would end the output while it is shorter than min_new_tokens."""

    def __init__(self, minimum: int, stop_ids: list[int], output_ids: list[int]):
        self.minimum, self.stop_ids, self.output_ids = minimum, stop_ids, output_ids

    def __call__(self, row: torch.Tensor) -> torch.Tensor:
        if len(self.output_ids) >= self.minimum:
            return row
        return row.index_fill(0, on_device(self.stop_ids, row), float("-inf"))


class LogitBias:
    def __init__(self, bias: dict[int, float]):
        self.ids, self.values = list(bias), list(bias.values())

    def __call__(self, row: torch.Tensor) -> torch.Tensor:
        return row.index_add(0, on_device(self.ids, row), on_device(self.values, row, row.dtype))


def processors_for(
    params: SamplingParams, prompt_ids: Sequence[int], output_ids: list[int], eos_ids: list[int]
) -> list[LogitsProcessor]:
    """The processors `params` ask for, reading the live `output_ids` list of their request; [] for none."""
    out: list[LogitsProcessor] = []
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1:
        out.append(Penalties(params, prompt_ids, output_ids))
    stop_ids = params.stop_token_ids + ([] if params.ignore_eos else eos_ids)
    if params.min_new_tokens and stop_ids:
        out.append(MinNewTokens(params.min_new_tokens, stop_ids, output_ids))
    if params.logit_bias:
        out.append(LogitBias(params.logit_bias))
    return out
