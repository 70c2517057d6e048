"""What this device moves per second, measured in the run that uses it (bench_latency's floor): device memory (a
large device-to-device copy, read + write counted), host to device from pinned memory (a large copy), and the top-k
row gather (host_copy.gather_rows over UVA, at a given row layout, after a copy has swept the caches as a step's
weights do). On CPU the same operations on CPU memory, at small sizes: only so that the code runs there."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch

from tailorkv.kernels import host_copy
from tailorkv.memory.host_memory import host_tensor


class Bandwidths(NamedTuple):
    """Bytes per second: device memory, pinned host -> device copies, UVA top-k row gathers."""

    device: float
    host_copy: float
    row_gather: float

    def as_row(self) -> dict:
        return {f"{k}_gb_per_s": round(v / 1e9, 1) for k, v in self._asdict().items()}


def _seconds(fn, device: torch.device, before=None, reps: int = 5) -> float:
    """Median seconds of fn() over `reps` runs after one warm-up (`before` runs untimed ahead of each)."""
    times = []
    for i in range(reps + 1):
        if before:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
        if i:
            times.append(dt)
    return statistics.median(times)


def measure(
    device: torch.device,
    row_shape: tuple[int, int, int],
    row_dtype: torch.dtype,
    top_k: int = 128,
    batch: int = 4,
    mib: int | None = None,
) -> Bandwidths:
    """The three bandwidths; rows [tokens per page, heads, row width] of `row_dtype` (the host tier's layout)."""
    cuda = device.type == "cuda"
    n = (mib or (256 if cuda else 16)) << 20  # 256 MiB: past the largest L2 (H200: 50 MB)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dev = 2 * n / _seconds(lambda: dst.copy_(src), device)
    host = host_tensor((n,), torch.uint8, cuda)
    h2d = n / _seconds(lambda: dst.copy_(host, non_blocking=True), device)
    t, h, w = row_shape
    page = h * t * w * torch.empty(0, dtype=row_dtype).element_size()
    pages = max(n // page, batch)
    rows = host_tensor((pages, t, h, w), row_dtype, cuda)
    per_row = pages // batch
    table = (torch.arange(batch)[:, None] * per_row + torch.arange(per_row)).to(device)
    idx = torch.rand(batch, h, per_row * t, device=device).topk(min(top_k, per_row * t), -1)
    ops = host_copy.ops(device)
    gathered = batch * h * idx.indices.shape[-1] * w * rows.element_size()
    sweep = lambda: dst.copy_(src)  # noqa: E731
    gather = gathered / _seconds(lambda: ops.gather_rows(rows, table, idx.indices), device, sweep)
    return Bandwidths(dev, h2d, gather)
