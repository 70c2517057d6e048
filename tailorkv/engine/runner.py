"""ModelRunner: turns a scheduled step into one batched forward pass and returns the logits to sample from."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kvcache.batch import ForwardBatch
from ..kvcache.policy import KVPolicy
from ..memory.host_memory import to_device
from ..models.llama import LlamaModel
from .cuda_graph import DecodeGraphs
from .sampling import token_logprobs

SCORE_ROWS = (
    256  # prompt positions whose logits [SCORE_ROWS, vocab] exist at once (prompt logprobs)
)


class PromptScore(NamedTuple):
    """Prompt logprobs a step computes for one sequence: positions first.. of its chunk predict `targets`."""

    first: int  # offset in the chunk of the position whose logits predict targets[0]
    targets: list[int]
    top_n: int


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        policy: KVPolicy,
        device: torch.device,
        cuda_graph: bool = False,
        max_rows: int = 1,
    ):
        self.model, self.policy, self.device = model, policy, device
        self.graphs = (
            DecodeGraphs(model, policy, device, max_rows)
            if cuda_graph and device.type == "cuda"
            else None
        )

    def forward(
        self,
        rids: list[int],
        start: list[int],
        new: list[int],
        tokens: list[int],
        want_logits: list[int],
    ) -> torch.Tensor:
        """Compute the step; `tokens` is the flat list of new token ids. Returns float32 logits [len(want), V]
        of the last token of each sequence index in `want_logits`."""
        return self.run(rids, start, new, tokens, want_logits)[0]

    @torch.inference_mode()
    def run(
        self,
        rids: list[int],
        start: list[int],
        new: list[int],
        tokens: list[int],
        want_logits: list[int],
        score: dict[int, PromptScore] | None = None,
        ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, tuple[list[float], list | None]]]:
        """`forward`, and for each sequence index i of `score` the logprobs of its prompt tokens predicted in this
        step (token_logprobs), SCORE_ROWS positions' logits at a time. `ids`: a decode step's tokens already on the
        device (the overlap schedule's), in place of `tokens`."""
        batch = ForwardBatch.build(rids, start, new, self.device)
        if ids is None:
            flat = torch.tensor(tokens, dtype=torch.long)
            ids = to_device(flat, self.device)
        hidden = self._replay(batch, ids) if batch.is_decode else self._two_passes(batch, flat)
        if hidden is None:
            hidden = self._pass(batch, ids)
        last = to_device(
            torch.tensor([batch.cu[i + 1] - 1 for i in want_logits], dtype=torch.long), self.device
        )
        scores = {}
        for i, (first, targets, top_n) in (score or {}).items():
            at, picked, top = batch.cu[i] + first, [], []
            for k in range(0, len(targets), SCORE_ROWS):
                part = targets[k : k + SCORE_ROWS]
                p, t = token_logprobs(
                    self.model.logits(hidden[at + k : at + k + len(part)]), part, top_n
                )
                picked += p
                top += t or []
            scores[i] = (picked, top if top_n else None)
        return self.model.logits(hidden[last]), scores

    def _pass(self, batch: ForwardBatch, ids: torch.Tensor) -> torch.Tensor:
        """One eager forward pass: hidden states [T, hidden]."""
        step = self.policy.prepare(batch)
        hidden = self.model(ids, batch.positions, self.policy, step)
        self.policy.finish(step)
        return hidden

    def _replay(
        self, batch: ForwardBatch, ids: torch.Tensor, capture: bool = True
    ) -> torch.Tensor | None:
        """A decode pass replayed from the CUDA graphs, or None when there are none or they cannot run it (or
        its shape has no graph and `capture` is False)."""
        graphed = self.graphs.run(ids, batch, capture) if self.graphs is not None else None
        if graphed is None:
            return None
        self.policy.finish(graphed[1])
        return graphed[0]

    def _two_passes(self, batch: ForwardBatch, flat: torch.Tensor) -> torch.Tensor | None:
        """A step of decode rows and prompt chunks as two passes: the decode rows replayed from the CUDA graphs,
        then the chunks eagerly. The weights are read twice (~3.5 ms for an 8B model on an H200) instead of the
        decode rows' attention and host time running eagerly (~25 ms for 8 tailor rows at 32k). None (one eager
        pass) without graphs or decode rows, or when the policy cannot graph these rows, or their shape has no graph
        yet: a capture (~0.13 s for 8 tailor rows on the H200, once per shape as contexts grow) waits for a step
        without prompt chunks, which is short enough to hold it (the decoders' longest gap beside a long prompt's
        chunks was such a capture, 0.32-0.35 s against the 0.2 s step budget), or for cuda_graph.MAX_DEFERRED such
        steps. Such steps capture the shapes their rows grow into cuda_graph.AHEAD tokens early, so the steps
        beside a long prompt's chunks find them."""
        dec = [i for i, n in enumerate(batch.new) if n == 1]
        rest = [i for i, n in enumerate(batch.new) if n != 1]
        if self.graphs is None or not dec:
            return None

        def rows(idx: list[int]) -> ForwardBatch:
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            return ForwardBatch.build(
                pick(batch.rids), pick(batch.start), pick(batch.new), self.device
            )

        at = torch.tensor([batch.cu[i] for i in dec], dtype=torch.long)
        decoded = self._replay(rows(dec), to_device(flat[at], self.device), capture=False)
        if decoded is None:
            return None
        chunks = torch.cat([torch.arange(batch.cu[i], batch.cu[i + 1]) for i in rest])
        prompt = self._pass(rows(rest), to_device(flat[chunks], self.device))
        hidden = prompt.new_empty(len(flat), prompt.shape[-1])
        hidden[to_device(at, self.device)] = decoded
        hidden[to_device(chunks, self.device)] = prompt
        return hidden
