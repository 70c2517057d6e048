"""Triton version of block_maxima.py (same function, signature and result): one program per (row and KV head, run
of `_BLOCKS` blocks) loads the run's scores as a [blocks, chunk] tile, the range's mask applied in the load, and
stores their maxima. The grid and tile follow from the shape alone: torch.compile's fused reduction of the same
function, compiled for other sizes first, took 7-9x longer in a captured step than compiled for its own
(benchmarks/NOTES.md, 2026-12-06)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 1024  # scores a program reads: _BLOCKS = _TILE // chunk (rounded to a power of 2) blocks


@triton.jit(do_not_specialize=["L", "NB"])
def _block_maxima_kernel(
    s_ptr,
    begin_ptr,
    end_ptr,
    out_ptr,
    H,
    L,
    NB,
    stride_row,
    CHUNK: tl.constexpr,
    CHUNK_P2: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    r, t = tl.program_id(0), tl.program_id(1)
    seq = r // H
    lo = tl.load(begin_ptr + seq)
    hi = tl.minimum(tl.load(end_ptr + seq), L)
    blk = t * BLOCKS + tl.arange(0, BLOCKS)
    j = tl.arange(0, CHUNK_P2)
    pos = blk[:, None] * CHUNK + j[None, :]
    inside = (j[None, :] < CHUNK) & (pos >= lo) & (pos < hi)
    x = tl.load(s_ptr + r.to(tl.int64) * stride_row + pos, mask=inside, other=float("-inf"))
    tl.store(out_ptr + r.to(tl.int64) * NB + blk, tl.max(x, axis=1), mask=blk < NB)


def block_maxima(
    scores: torch.Tensor, begin: torch.Tensor, end: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Same contract as block_maxima.block_maxima."""
    *lead, h, n = scores.shape
    blocks = -(-n // chunk)
    out = torch.empty(*lead, h, blocks, dtype=torch.float32, device=scores.device)
    if not out.numel():
        return out
    rows = scores.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    # one range per sequence: a 0-d range stands for every one
    begin, end = (x.expand(lead).reshape(-1).contiguous() for x in (begin, end))
    chunk_p2 = triton.next_power_of_2(chunk)
    per = max(1, _TILE // chunk_p2)
    _block_maxima_kernel[(rows.shape[0], triton.cdiv(blocks, per))](
        rows,
        begin,
        end,
        out,
        h,
        n,
        blocks,
        rows.stride(0),
        CHUNK=chunk,
        CHUNK_P2=chunk_p2,
        BLOCKS=per,
    )
    return out
