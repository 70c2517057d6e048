"""Triton version of block_topk.py (same function, signature and result): the blocks' maxima
(block_maxima_triton.py), then `_select_kernel` twice, one program a row each time: the k' blocks with the largest
maxima (their ids in ascending order), then the k_r largest scores among those blocks' positions, written in
position order. Each selection is a radix select held in one program: four passes count the 8-bit digits of the
keys (token_topk_triton.py's order-preserving keys) with tl.histogram, each settling one digit of the k-th key,
then a pass writes the keys above it and the lowest-placed ties. Three launches against the radix select's seven
over the whole row, or torch.topk's two top-ks, sorts and gathers; at k = 128 and blocks of 32 a selection reads
4,096 keys a row, from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_maxima_triton import block_maxima
from .token_topk_triton import _per_row, _row_k

_TILE = 4096  # keys a program holds at a time
_NB = 256  # bins of an 8-bit digit


@triton.jit
def _keys(x):
    """Order-preserving int64 keys in [0, 2^32) of float32 scores (-0.0 as 0.0; -inf above 0, padding's key)."""
    x = tl.where(x == 0.0, 0.0, x)
    u = x.to(tl.uint32, bitcast=True).to(tl.int64)
    return tl.where(u >= 2147483648, 4294967295 - u, u + 2147483648)


@triton.jit
def _tile(
    src_ptr,
    blocks_ptr,
    r,
    e,
    N,
    stride_r,
    L,
    lo,
    hi,
    KA,
    CHUNK,
    CHUNK_P2: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Elements e of row r's selection: (positions, real: a candidate and not padding, keys). GATHER: element
    j * CHUNK_P2 + i is position i of the row's j-th selected block, -inf outside [lo, hi); else element e is the
    row's e-th value (a block's maximum) and its position e."""
    if GATHER:
        j = e // CHUNK_P2
        i = e % CHUNK_P2
        inb = (j < KA) & (i < CHUNK)
        blk = tl.load(blocks_ptr + r * KA + j, mask=inb, other=0)
        pos = blk * CHUNK + i
        real = inb & (pos < L)
        x = tl.load(src_ptr + r * stride_r + pos, mask=real, other=0.0)
        x = tl.where((pos >= lo) & (pos < hi), x, float("-inf"))
    else:
        pos = e.to(tl.int64)
        real = e < N
        x = tl.load(src_ptr + r * stride_r + pos, mask=real, other=0.0)
    return pos, real, _keys(x), x


@triton.jit(do_not_specialize=["stride_kr", "K", "H", "L", "N", "stride_r", "KA", "CHUNK"])
def _select_kernel(
    src_ptr,
    blocks_ptr,
    begin_ptr,
    end_ptr,
    kr_ptr,
    stride_kr,
    K,
    out_ptr,
    valid_ptr,
    H,
    L,
    N,
    stride_r,
    KA,
    CHUNK,
    CHUNK_P2: tl.constexpr,
    GATHER: tl.constexpr,
    NB: tl.constexpr,
    TILE: tl.constexpr,
):
    """Row r's kr largest keys among its N elements (GATHER: kr = the row's own k clamped to [0, K], else K),
    written to out [rows, K] in element order, ties lowest first; GATHER also writes valid (score above -inf).
    Slots from kr on: position 0, not valid."""
    r = tl.program_id(0).to(tl.int64)
    b = r // H
    lo, hi = tl.load(begin_ptr + b), tl.load(end_ptr + b)
    kr = K.to(tl.int64)
    if GATHER:
        kr = tl.minimum(tl.maximum(tl.load(kr_ptr + b * stride_kr).to(tl.int64), 0), K)
    bins = tl.arange(0, NB)
    if kr > 0:
        kth = kr * 0  # the digits settled so far, then the kr-th key itself
        need = kr  # keys to take among those equal to kth in its settled digits
        for lvl in tl.static_range(4):
            shift = 24 - 8 * lvl
            h = tl.zeros((NB,), tl.int32)
            for off in range(0, N, TILE):
                e = off + tl.arange(0, TILE)
                _, real, key, _ = _tile(
                    src_ptr, blocks_ptr, r, e, N, stride_r, L, lo, hi, KA, CHUNK, CHUNK_P2, GATHER
                )
                ok = real & ((key >> (shift + 8)) == kth)  # level 0: key >> 32 is 0, every key
                h += tl.histogram(((key >> shift) & (NB - 1)).to(tl.int32), NB, mask=ok)
            h64 = h.to(tl.int64)
            above = tl.sum(h64, 0) - tl.cumsum(h64, 0)  # keys in higher bins
            hit = (above < need) & (above + h64 >= need)
            digit = tl.max(tl.where(hit, bins, -1), 0).to(tl.int64)
            need -= tl.sum(tl.where(bins == digit, above, 0), 0)
            kth = kth * NB + digit
        slot0 = kr * 0
        tie0 = kr * 0
        for off in range(0, N, TILE):
            e = off + tl.arange(0, TILE)
            pos, real, key, x = _tile(
                src_ptr, blocks_ptr, r, e, N, stride_r, L, lo, hi, KA, CHUNK, CHUNK_P2, GATHER
            )
            is_tie = real & (key == kth)
            rank = tie0 + tl.cumsum(is_tie.to(tl.int64), 0) - 1
            chosen = (real & (key > kth)) | (is_tie & (rank < need))
            slot = slot0 + tl.cumsum(chosen.to(tl.int64), 0) - 1
            tl.store(out_ptr + r * K + slot, pos, mask=chosen)
            if GATHER:
                tl.store(valid_ptr + r * K + slot, (x > float("-inf")).to(tl.int8), mask=chosen)
            tie0 += tl.sum(is_tie.to(tl.int64), 0)
            slot0 += tl.sum(chosen.to(tl.int64), 0)
    if GATHER:
        for off in range(0, K, TILE):
            slot = off + tl.arange(0, TILE)
            rest = (slot >= kr) & (slot < K)
            tl.store(out_ptr + r * K + slot, tl.zeros((TILE,), tl.int64), mask=rest)
            tl.store(valid_ptr + r * K + slot, tl.zeros((TILE,), tl.int8), mask=rest)


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n = scores.shape
    kk, dev = min(k, n), scores.device
    begin, end = (_per_row(x, b, 0, dev) for x in (begin, end))
    kr, stride_kr = _row_k(k_rows, kk, dev)
    rows = b * h
    x = scores.float().reshape(rows, n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    maxima = block_maxima(x.view(b, h, n), begin, end, chunk).view(rows, -1)
    nb = maxima.shape[-1]
    ka = min(kk, nb)
    blocks = torch.empty(rows, ka, dtype=torch.int64, device=dev)
    positions = torch.empty(rows, kk, dtype=torch.int64, device=dev)
    valid = torch.empty(rows, kk, dtype=torch.int8, device=dev)
    common = (begin, end, kr, stride_kr)
    # the blocks: every row's ka largest maxima (kr = K = ka)
    _select_kernel[(rows,)](
        maxima, blocks, *common, ka, blocks, valid, h, n, nb, nb, ka, 1, 1, False, _NB, _TILE,
        num_warps=8,
    )  # fmt: skip
    # then the scores of their positions
    n_elems = ka * triton.next_power_of_2(chunk)
    _select_kernel[(rows,)](
        x, blocks, *common, kk, positions, valid, h, n, n_elems, x.stride(0), ka, chunk,
        triton.next_power_of_2(chunk), True, _NB, _TILE, num_warps=8,
    )  # fmt: skip
    return positions.view(b, h, kk), valid.view(torch.bool).view(b, h, kk)
