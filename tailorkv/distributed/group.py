"""A tensor-parallel group: `size` processes, one per device, that each hold a slice of every layer. Collectives go
through torch.distributed (NCCL on GPU, gloo on CPU); the engine's control messages (the scheduled steps, pickled)
go through a gloo group on every device, as SGLang's TP workers receive theirs."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)  # a long prefill on CPU between two collectives


class TPGroup:
    def __init__(self, rank: int, size: int, device: torch.device, init_method: str):
        """Join the group (every rank calls this with the same `init_method`, e.g. tcp://127.0.0.1:PORT)."""
        self.rank, self.size, self.device = rank, size, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=size, timeout=TIMEOUT
        )
        self.control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x`, in place."""
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side along the last dimension: [..., size * n]."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, message=None):
        """Rank 0 sends `message` (any picklable object); every rank returns it."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
