"""Triton version of block_topk.py (same function, signature and result): the block maxima (block_maxima_triton,
unless the caller has them: the sketch kernel's, in the engine), then one program per (row, KV head) that keeps
its keys in registers (the taken blocks' ids pass through a scratch row):
- the k_r blocks with the largest maxima: the k_r-th largest key found two bits at a time (16 reductions over the
  row's blocks, each of three counts packed in one integer; keys as token_topk_triton.order_keys), the blocks above
  it and the first tied ones taken, their ids written in block order;
- then the same over the taken blocks' positions (k_r * chunk scores, gathered), whose taken positions are written
  in position order, as the blocks were taken in order.
Two launches a layer where torch.topk's two calls, the candidates' gather and the mask took ~20: in CUDA graphs on
the H100, 0.119 against 0.193 ms a call at 32k and batch 40, 0.084 against 0.120 at 128k and batch 9 (bench_topk,
benchmarks/NOTES.md 2026-12-06). A tile holds at most _MAX_TILE keys: `fits` says whether a shape's do (k 128 and
chunk 32: up to 256k positions); the caller takes another path where not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailorkv.kernels.block_maxima_triton import block_maxima
from tailorkv.kernels.token_topk_triton import order_keys, per_row, row_bounds, row_k

_MAX_TILE = 8192  # keys a program holds at once: 32 a thread at 8 warps


def _tiles(length: int, k: int, chunk: int) -> tuple[int, int, int]:
    """(blocks' tile, taken blocks' tile rows, a block's tile width): powers of two."""
    blocks = triton.cdiv(length, chunk)
    return (
        triton.next_power_of_2(blocks),
        triton.next_power_of_2(min(k, length, blocks)),
        triton.next_power_of_2(chunk),
    )


def fits(length: int, k: int, chunk: int) -> bool:
    nb, kb, cp = _tiles(length, k, chunk)
    return nb <= _MAX_TILE and kb * cp <= _MAX_TILE


@triton.jit
def _take(keys, present, kr):
    """The kr largest of the present keys, ties first in the tile's order: (taken, each taken one's slot among
    them in tile order). kr-th largest key: two bits at a time from the highest (0 if fewer are present: all
    taken), the keys reaching each of the three candidates counted in one reduction, 16 bits a count."""
    t = kr.to(tl.int64) * 0
    one = t + 1
    for i in tl.static_range(16):
        s = 30 - 2 * i
        ge = (keys >= (t | (one << s))).to(tl.int64)
        ge += (keys >= (t | (2 * one << s))).to(tl.int64) << 16
        ge += (keys >= (t | (3 * one << s))).to(tl.int64) << 32
        n = tl.sum(tl.where(present, ge, 0), 0)
        # the counts (at most _MAX_TILE each) fall as the candidate rises: the digit is how many reach kr
        digit = ((n & 0xFFFF) >= kr).to(tl.int64)
        digit += (((n >> 16) & 0xFFFF) >= kr).to(tl.int64) + ((n >> 32) >= kr).to(tl.int64)
        t = t | (digit << s)
    above = present & (keys > t)
    tied = present & (keys == t)
    need = kr - tl.sum(above.to(tl.int32), 0)
    taken = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= need))
    return taken, tl.cumsum(taken.to(tl.int32), 0) - 1


@triton.jit(do_not_specialize=["L", "NB", "stride_r", "stride_kr", "K"])
def _block_topk_kernel(
    s_ptr,
    max_ptr,
    begin_ptr,
    end_ptr,
    kr_ptr,
    stride_kr,
    K,
    blk_ptr,
    pos_ptr,
    valid_ptr,
    H,
    L,
    NB,
    stride_r,
    CHUNK: tl.constexpr,
    NBP: tl.constexpr,
    KB: tl.constexpr,
    CP: tl.constexpr,
    KP: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    lo, hi, kr = row_bounds(r, H, begin_ptr, end_ptr, kr_ptr, stride_kr, K)
    # the blocks
    blk = tl.arange(0, NBP)
    present = blk < NB
    m = tl.load(max_ptr + r * NB + blk, mask=present, other=float("-inf"))
    taken, slot = _take(order_keys(m), present, kr)
    tl.store(blk_ptr + r * KB + slot, blk, mask=taken)
    n_blocks = tl.sum(taken.to(tl.int32), 0)
    tl.debug_barrier()  # the ids written above are read back by other threads
    # their positions, a block a tile row
    i = tl.arange(0, KB * CP)
    j, c = i // CP, i % CP
    ok = (j < n_blocks) & (c < CHUNK)
    pos = tl.load(blk_ptr + r * KB + j, mask=ok, other=0).to(tl.int64) * CHUNK + c
    present = ok & (pos < L)
    x = tl.load(s_ptr + r * stride_r + pos, mask=present, other=0.0)
    x = tl.where((pos >= lo) & (pos < hi), x, float("-inf"))
    taken, slot = _take(order_keys(x), present, kr)
    tl.store(pos_ptr + r * K + slot, pos, mask=taken)
    tl.store(valid_ptr + r * K + slot, (x > float("-inf")).to(tl.int8), mask=taken)
    # the slots past the row's own k
    s = tl.arange(0, KP)
    rest = (s >= tl.sum(taken.to(tl.int32), 0)) & (s < K)
    tl.store(pos_ptr + r * K + s, tl.zeros([KP], tl.int64), mask=rest)
    tl.store(valid_ptr + r * K + s, tl.zeros([KP], tl.int8), mask=rest)


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
    chunk: int = 32,
    maxima: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as block_topk.top_positions, for shapes that `fits`."""
    b, h, n = scores.shape
    kk = min(k, n)
    if not fits(n, kk, chunk):
        raise ValueError(f"block_topk's tiles do not hold {n} positions, k {kk} and chunk {chunk}")
    begin, end = (per_row(x, b, 0, scores.device) for x in (begin, end))
    kr, stride_kr = row_k(k_rows, kk, scores.device)
    x = scores.float()
    if maxima is None:
        maxima = block_maxima(x, begin, end, chunk)
    maxima = maxima.reshape(b * h, -1).contiguous()
    x = x.reshape(b * h, n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    nbp, kb, cp = _tiles(n, kk, chunk)
    rows, dev = b * h, scores.device
    blocks = torch.empty(rows, kb, dtype=torch.int32, device=dev)
    positions = torch.empty(rows, kk, dtype=torch.int64, device=dev)
    valid = torch.empty(rows, kk, dtype=torch.int8, device=dev)
    if rows and kk:
        _block_topk_kernel[(rows,)](
            x,
            maxima,
            begin,
            end,
            kr,
            stride_kr,
            kk,
            blocks,
            positions,
            valid,
            h,
            n,
            maxima.shape[-1],
            x.stride(0),
            CHUNK=chunk,
            NBP=nbp,
            KB=kb,
            CP=cp,
            KP=triton.next_power_of_2(kk),
            num_warps=8 if max(nbp, kb * cp) > 2048 else 4,
        )
    return positions.view(b, h, kk), valid.view(torch.bool).view(b, h, kk)
