"""ModelRunner: turns a scheduled step into one batched forward pass and returns the logits to sample from."""

from __future__ import annotations

import torch

from ..kvcache.batch import ForwardBatch
from ..kvcache.policy import KVPolicy
from ..memory.host_memory import to_device
from ..models.llama import LlamaModel
from .cuda_graph import DecodeGraphs


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

    @torch.inference_mode()
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
        batch = ForwardBatch.build(rids, start, new, self.device)
        ids = to_device(torch.tensor(tokens, dtype=torch.long), self.device)
        graphed = (
            self.graphs.run(ids, batch) if self.graphs is not None and batch.is_decode else None
        )
        if graphed is None:
            step = self.policy.prepare(batch)
            hidden = self.model(ids, batch.positions, self.policy, step)
        else:
            hidden, step = graphed
        self.policy.finish(step)
        last = to_device(
            torch.tensor([batch.cu[i + 1] - 1 for i in want_logits], dtype=torch.long), self.device
        )
        return self.model.logits(hidden[last])
