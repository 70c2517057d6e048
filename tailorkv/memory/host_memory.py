"""The host tier's memory: page-locked (pinned) when a CUDA device reads it, so GPU kernels reach it through UVA;
small host tensors sent to the device through it.

torch's pinned allocator (pin_memory=True) rounds every allocation up to a power of two: a 40 GiB host tier
would lock 64 GiB, and an 80 GiB one fails on a 128 GiB host. Here the tensor is allocated as ordinary memory and
registered with cudaHostRegister, which locks exactly its bytes; the registration is dropped when the tensor is
collected.
"""

from __future__ import annotations

import weakref

import torch


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An uninitialised CPU tensor, page-locked exactly (no rounding) when `pinned`."""
    t = torch.empty(shape, dtype=dtype)
    if pinned and t.numel():
        cudart = torch.cuda.cudart()
        ptr = t.data_ptr()
        err = cudart.cudaHostRegister(ptr, t.numel() * t.element_size(), 0)
        if err != cudart.cudaError.success:
            raise RuntimeError(
                f"cudaHostRegister of {t.numel() * t.element_size() / 2**30:.1f} GiB failed: {err}"
            )
        weakref.finalize(t, cudart.cudaHostUnregister, ptr)
    return t


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on `device`, through pinned memory on CUDA so that the copy does not wait for the stream
    (torch keeps the pinned block until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
