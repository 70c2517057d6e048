"""The overlap schedule (SGLang's overlap scheduler, vLLM's async scheduling): a decode step is launched before the
host has the previous step's tokens, which the device hands to it directly, so that scheduling, the step's inputs
and the graph launch run while the device computes the step before.

A request that ends in step N (a stop token, a stop string, its length) is known to have ended only once step N
lands, after step N+1 was launched with it: it computes one token more, which nobody reads. What needs the host to
have every token waits for the step in flight: a step that prefills or retracts, and rows with logits processors
(penalties, logit bias, grammars), forced tokens or logprobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..memory.host_memory import to_device
from ..scheduler.scheduler import Step
from .request import Request


def overlappable(plan: Step, reqs: list[Request]) -> bool:
    """Whether this step can run before the host has the tokens of the step in flight."""
    return (
        not plan.retracted
        and all(n == 1 and not s.prefilling for s, n in zip(plan.seqs, plan.new))
        and all(
            not r.logits_processors
            and r.forced_ids is None
            and r.top_logprobs_num is None
            and r.params.max_new_tokens > 0
            for r in reqs
        )
    )


@dataclass
class InFlight:
    """A launched decode step whose sampled tokens the host does not have yet."""

    reqs: list[Request]
    tokens: torch.Tensor  # [B] on the device
    launched: float = field(default_factory=time.perf_counter)
    rows: dict[int, int] = field(init=False)  # rid -> row
    _host: torch.Tensor = field(init=False)
    _ready: torch.cuda.Event | None = field(init=False, default=None)

    def __post_init__(self):
        self.rows = {r.rid: i for i, r in enumerate(self.reqs)}
        if self.tokens.is_cuda:
            self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self._host.copy_(self.tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = self.tokens

    def chosen(self) -> list[int]:
        """The tokens, once the step has run."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


def input_ids(reqs: list[Request], prev: InFlight | None, device) -> torch.Tensor:
    """A decode step's input tokens on the device: each row's newest token, from the step in flight for the rows it
    computes, else from the host."""
    known = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.long)
    ids = to_device(known, device)
    src = [prev.rows.get(r.rid, -1) if prev else -1 for r in reqs]
    if max(src, default=-1) < 0:
        return ids
    at = to_device(torch.tensor(src, dtype=torch.long), device)
    return torch.where(at >= 0, prev.tokens[at.clamp(min=0)], ids)
