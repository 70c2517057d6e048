"""One forward step as its layers read it: the ForwardBatch (which sequences, where their new tokens sit) and the
StepState a KV policy builds from it before the layers run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory.host_memory import to_device


@dataclass
class ForwardBatch:
    """A flat batch: sequence i contributes tokens [cu[i], cu[i+1]) at positions start[i] .. start[i]+new[i]-1."""

    rids: list[int]
    start: list[int]  # tokens already in the cache before this step
    new: list[int]  # tokens computed in this step (1 for a decode)
    positions: torch.Tensor  # [T] long
    cu: list[int]  # prefix sums of `new`, len B+1

    @classmethod
    def build(cls, rids: list[int], start: list[int], new: list[int], device) -> "ForwardBatch":
        cu = [0]
        for n in new:
            cu.append(cu[-1] + n)
        pos = to_device(torch.cat([torch.arange(s, s + n) for s, n in zip(start, new)]), device)
        return cls(rids, start, new, pos, cu)

    @property
    def size(self) -> int:
        return len(self.rids)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.new)

    def seq(self, i: int) -> slice:
        return slice(self.cu[i], self.cu[i + 1])

    def token_rows(self, rows: list[int], device) -> torch.Tensor | slice:
        """The first token of each row in `rows` (in order) within the flat batch: a slice where they are all of
        its tokens (a decode-only step: q[rows] is a view, no gather), else an index tensor on `device`."""
        if len(rows) == self.cu[-1]:
            return slice(0, len(rows))
        return to_device(torch.tensor([self.cu[i] for i in rows]), device)

    def total_len(self, i: int) -> int:
        return self.start[i] + self.new[i]


@dataclass
class StepState:
    """What every layer of one step reads: the batch, and (in a policy's subclass: FullStep, TailorStep) what the
    policy's `prepare` computed for it once. Its mutable fields are the step's scratch, dropped with it."""

    batch: ForwardBatch
