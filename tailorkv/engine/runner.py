"""ModelRunner: turns a scheduled step into one batched forward pass and returns the logits to sample from."""
from __future__ import annotations

import torch

from ..kvcache.batch import ForwardBatch
from ..kvcache.policy import KVPolicy
from ..models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, policy: KVPolicy, device: torch.device):
        self.model, self.policy, self.device = model, policy, device

    @torch.inference_mode()
    def forward(self, rids: list[int], start: list[int], new: list[int], tokens: list[int],
                want_logits: list[int]) -> torch.Tensor:
        """Compute the step; `tokens` is the flat list of new token ids. Returns float32 logits [len(want), V]
        of the last token of each sequence index in `want_logits`."""
        batch = ForwardBatch.build(rids, start, new, self.device)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.policy.prepare(batch)
        hidden = self.model(ids, batch.positions, self.policy, batch)
        self.policy.finish(batch)
        last = torch.tensor([batch.cu[i + 1] - 1 for i in want_logits], dtype=torch.long, device=self.device)
        return self.model.logits(hidden[last])
