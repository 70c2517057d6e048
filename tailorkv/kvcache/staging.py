"""Per-step input tensors sent to the device in one copy without a stream sync.

A decode step's views (page tables, slots, lengths, masks) are small device tensors refilled from the host every
step. Copied one by one from ordinary (pageable) memory, each copy waits for the stream to drain before it starts.
Here they are views of one device byte buffer with a pinned host twin of the same layout: the host writes the twin,
`send` moves all of it with one non-blocking copy, and the twin is not written again until that copy has run.
"""

from __future__ import annotations

import math

import torch

ALIGN = 16  # bytes: every field starts where Triton assumes a tensor does (it compiles a variant for others)


class StagedInputs:
    """Device tensors named by `fields` ({name: (shape, dtype)}): `device[name]` for the kernels, `host()[name]`
    to write the next values into, `send()` to move them."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], device):
        device = torch.device(device)
        spans, total = {}, 0
        for name, (shape, dtype) in fields.items():
            size = math.prod(shape) * dtype.itemsize
            spans[name] = (total, size, shape, dtype)
            total += -(-size // ALIGN) * ALIGN
        cuda = device.type == "cuda"
        self._device_buf = torch.zeros(max(total, ALIGN), dtype=torch.uint8, device=device)
        self._host_buf = torch.zeros(max(total, ALIGN), dtype=torch.uint8, pin_memory=cuda)
        self.device = self._views(self._device_buf, spans)
        self._host = self._views(self._host_buf, spans)
        self._sent = torch.cuda.Event() if cuda else None

    @staticmethod
    def _views(buf: torch.Tensor, spans: dict) -> dict[str, torch.Tensor]:
        return {
            name: buf[o : o + n].view(dtype).view(shape)
            for name, (o, n, shape, dtype) in spans.items()
        }

    def host(self) -> dict[str, torch.Tensor]:
        """The pinned views to write, once the previous send has left them."""
        if self._sent is not None:
            self._sent.synchronize()
        return self._host

    def send(self) -> None:
        self._device_buf.copy_(self._host_buf, non_blocking=True)
        if self._sent is not None:
            self._sent.record()
