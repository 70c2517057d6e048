"""The host tier's memory: page-locked (pinned) when a CUDA device reads it, so GPU kernels reach it through UVA;
small host tensors sent to the device through it.

torch's pinned allocator (pin_memory=True) rounds every allocation up to a power of two: a 40 GiB host tier
would lock 64 GiB, and an 80 GiB one fails on a 128 GiB host. Here the tensor is allocated as ordinary memory and
registered with cudaHostRegister, which locks exactly its bytes; the registration is dropped when the tensor is
collected.
"""

from __future__ import annotations

import ctypes
import sys
import weakref
from pathlib import Path

import torch

HOST_SHARE = (
    0.75  # of the memory available at start, what a CUDA engine's host tiers lock by default
)
CPU_HOST_GIB = 4.0  # the default on CPU, where the "host tier" is the same memory as the model's


def available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory this process may still use: the kernel's MemAvailable, less where a cgroup (v2) limit is lower
    (a container's); None where neither can be read."""
    avail = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path(cgroup, "memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def default_host_gib(cuda: bool, ranks: int = 1, available: int | None = None) -> float:
    """The host-tier budget per rank when none is given: on CUDA HOST_SHARE of the memory available (the OS and
    the rest of the process keep the other quarter), shared by the tensor-parallel ranks; CPU_HOST_GIB on CPU or
    where the available memory cannot be read."""
    available = available_bytes() if available is None else available
    if not cuda or available is None:
        return CPU_HOST_GIB
    return max(HOST_SHARE * available / ranks / 2**30, 1.0)


def host_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, pinned: bool, huge_pages: bool = False
) -> torch.Tensor:
    """An uninitialised CPU tensor, page-locked exactly (no rounding) when `pinned`; with `huge_pages`, advised to
    transparent huge pages before anything touches it (bench_uva_gather compares: on the H200 the top-k fetch did
    not gain from them, benchmarks/NOTES.md)."""
    t = torch.empty(shape, dtype=dtype)
    if huge_pages:
        advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
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


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


def advise_huge_pages(ptr: int, size: int) -> bool:
    """madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside [ptr, ptr + size); False where there are none or
    the kernel refuses (no transparent huge pages: the memory stays in 4 KiB pages)."""
    begin = -(-ptr // HUGE_PAGE) * HUGE_PAGE
    end = (ptr + size) // HUGE_PAGE * HUGE_PAGE
    if end <= begin or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), MADV_HUGEPAGE) == 0
