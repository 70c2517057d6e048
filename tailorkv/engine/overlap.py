"""The overlap schedule (SGLang's overlap scheduler, vLLM's async scheduling): a decode step is launched before the
host has the previous step's tokens, which the device hands to it directly, so that scheduling, the step's inputs
and the graph launch run while the device computes the step before. The step's sampling is queued after the step
before has landed, so logits processors (penalties, logit bias, grammars), forced tokens and logprobs see every
token so far.

A request that ends in step N (a stop token, a stop string, its length) is known to have ended only once step N
lands, after step N+1 was launched with it: it computes one token more, which nobody samples. A step that prefills
or would retract waits for the step in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..memory.host_memory import to_device
from ..scheduler.scheduler import Step
from .request import Request
from .sampling import Drawn, Sample


def overlappable(plan: Step, reqs: list[Request]) -> bool:
    """Whether this step can run before the host has the tokens of the step in flight."""
    return (
        not plan.retracted
        and all(n == 1 and not s.prefilling for s, n in zip(plan.seqs, plan.new))
        and all(r.params.max_new_tokens > 0 for r in reqs)
    )


@dataclass
class InFlight:
    """A launched decode step's samples: `tokens` [B] on the device for the next step, the host's copy later."""

    reqs: list[Request]
    tokens: torch.Tensor
    drawn: Drawn | None = None  # pinned copies of the samples, complete once `_ready` is
    # or the samples already on the host (a Sample or the row's exception)
    sampled: list | None = None
    launched: float = field(default_factory=time.perf_counter)
    rows: dict[int, int] = field(init=False)  # rid -> row
    _ready: torch.cuda.Event | None = field(init=False, default=None)

    def __post_init__(self):
        self.rows = {r.rid: i for i, r in enumerate(self.reqs)}
        if self.drawn is not None and self.tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    @classmethod
    def of(cls, reqs: list[Request], drawn: Drawn) -> InFlight:
        return cls(reqs, drawn.tokens, drawn=drawn.to_host())

    @classmethod
    def on_host(cls, reqs: list[Request], sampled: list, device) -> InFlight:
        """Samples the host already has (a row whose sampling raised: its exception, and any token)."""
        ids = [s.token if isinstance(s, Sample) else 0 for s in sampled]
        return cls(reqs, to_device(torch.tensor(ids, dtype=torch.long), device), sampled=sampled)

    def chosen(self) -> list:
        """Each row's Sample (or exception), once the step has run."""
        if self.sampled is not None:
            return self.sampled
        if self._ready is not None:
            self._ready.synchronize()
        return self.drawn.samples()


def input_ids(reqs: list[Request], prev: InFlight | None, device) -> torch.Tensor:
    """A decode step's input tokens on the device: each row's newest token, from the step in flight for the rows it
    computes, else from the host."""
    if prev is not None and [r.rid for r in reqs] == [r.rid for r in prev.reqs]:
        return prev.tokens  # the same rows (the usual step): nothing to copy
    known = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.long)
    ids = to_device(known, device)
    src = [prev.rows.get(r.rid, -1) if prev else -1 for r in reqs]
    if max(src, default=-1) < 0:
        return ids
    at = to_device(torch.tensor(src, dtype=torch.long), device)
    return torch.where(at >= 0, prev.tokens[at.clamp(min=0)], ids)
