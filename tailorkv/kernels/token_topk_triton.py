"""Triton version of token_topk.py (same function, signature and result): radix select of each row's k_r-th
largest score, then the positions above it (and the lowest-placed ties) written in position order.

A score's key is its float32 bits mapped to an unsigned order (negative: all bits flipped; else the sign bit set),
widened to int64. Four histogram passes (`_hist_kernel`, levels 0-3) count the keys' 8-bit digits, each among the
keys whose higher digits match the ones chosen so far. Each pass settles one digit from the last pass's histogram
(`_settle`: 256 bins) on top of the digits and the count still to take that the pass before it settled and left in
`state`, so no pass waits on a separate one and none redoes the levels before. The last pass also leaves, per
program and for every value of the last digit, its keys above and equal to the k_r-th key that digit would make
(`part`); `_write_kernel` settles the last digit, so the k_r-th key T, reads the earlier programs' counts at it and
places the selected positions. Each program covers one `CHUNK` of one row: six launches (a memset and five
kernels) against torch.topk's ~13 and its sort; k_rows are read in place and clamped there, and the write clears
the slots past a row's own k, so no small torch op runs around them. 8-bit digits, not 11: tl.histogram counts by
warp ballots, a lane per bins/32 bins, so 2,048 bins cost ~8x the instructions of 256 a score (PTX for sm_90:
~2,500 against ~300 a thread per 1,024 scores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = 8  # a digit's bits: 4 levels of 256 bins
_BLOCK = 1024  # scores a program reads at a time
_NB, _LEVELS = 1 << _BITS, 32 // _BITS
_TARGET_PROGRAMS = 512  # programs per pass to aim for (a few per SM), as the rows allow


@triton.jit
def _block_keys(s_ptr, r, stride_r, off, L, lo, hi, BLOCK: tl.constexpr):
    """The BLOCK positions from `off` of row r: (positions, inside the row, order-preserving int64 keys in
    [0, 2^32) of their scores, the scores). Positions outside [lo, hi) count as -inf, -0.0 as 0.0."""
    pos = off + tl.arange(0, BLOCK)
    inb = pos < L
    x = tl.load(s_ptr + r * stride_r + pos, mask=inb, other=0.0)
    x = tl.where((pos >= lo) & (pos < hi), x, float("-inf"))
    return pos, inb, order_keys(x), x


@triton.jit
def order_keys(x):
    """float32 scores -> int64 keys in [0, 2^32) in the same order, -0.0 the key of 0.0."""
    x = tl.where(x == 0.0, 0.0, x)
    u = x.to(tl.uint32, bitcast=True).to(tl.int64)
    return tl.where(u >= 2147483648, 4294967295 - u, u + 2147483648)


@triton.jit
def _settle(hist_ptr, state_ptr, r, kr, LEVEL: tl.constexpr, NB: tl.constexpr, ALL: tl.constexpr):
    """The first LEVEL + 1 digits of row r's kr-th largest key (as one integer) and how many keys equal to them in
    those digits are still to take (kr less the keys above): level LEVEL's digit from its histogram, on top of what
    the pass before left in `state` for the levels before."""
    if LEVEL == 0:
        prefix = kr * 0
        rem = kr
    else:
        prefix = tl.load(state_ptr + (r * ALL + LEVEL - 1) * 2)
        rem = tl.load(state_ptr + (r * ALL + LEVEL - 1) * 2 + 1)
    bins = tl.arange(0, NB)
    h = tl.load(hist_ptr + (r * ALL + LEVEL) * NB + bins).to(tl.int64)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys in higher bins
    hit = (above < rem) & (above + h >= rem)
    digit = tl.max(tl.where(hit, bins, -1), 0).to(tl.int64)
    rem -= tl.sum(tl.where(bins == digit, above, 0), 0)
    return prefix * NB + digit, rem


@triton.jit
def row_bounds(r, H, begin_ptr, end_ptr, kr_ptr, stride_kr, K):
    """Row r's range [lo, hi) and its own k, clamped to [0, K] (k_rows as the caller passed it: any strides)."""
    b = r // H
    kr = tl.minimum(tl.maximum(tl.load(kr_ptr + b * stride_kr).to(tl.int64), 0), K)
    return tl.load(begin_ptr + b), tl.load(end_ptr + b), kr


@triton.jit(do_not_specialize=["L", "stride_r", "CHUNK", "S", "stride_kr", "K"])
def _hist_kernel(
    s_ptr,
    begin_ptr,
    end_ptr,
    kr_ptr,
    stride_kr,
    K,
    hist_ptr,
    state_ptr,
    part_ptr,
    H,
    L,
    stride_r,
    CHUNK,
    S,
    LEVEL: tl.constexpr,
    NB: tl.constexpr,
    ALL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    lo, hi, kr = row_bounds(r, H, begin_ptr, end_ptr, kr_ptr, stride_kr, K)
    bits: tl.constexpr = 32 // ALL
    shift: tl.constexpr = 32 - bits * (LEVEL + 1)
    prefix = kr * 0
    if LEVEL > 0:
        prefix, rem = _settle(hist_ptr, state_ptr, r, kr, LEVEL - 1, NB, ALL)
        if s == 0:  # for the next pass
            tl.store(state_ptr + (r * ALL + LEVEL - 1) * 2, prefix)
            tl.store(state_ptr + (r * ALL + LEVEL - 1) * 2 + 1, rem)
    acc = tl.zeros((NB,), tl.int32)
    higher = tl.zeros((BLOCK,), tl.int32)
    for off in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK):
        _, inb, key, _ = _block_keys(s_ptr, r, stride_r, off, L, lo, hi, BLOCK)
        ok = inb & ((key >> (shift + bits)) == prefix)  # level 0: key >> 32 is 0, every key
        acc += tl.histogram(((key >> shift) & (NB - 1)).to(tl.int32), NB, mask=ok)
        if LEVEL == ALL - 1:
            higher += (inb & ((key >> bits) > prefix)).to(tl.int32)
    tl.atomic_add(
        hist_ptr + (r * ALL + LEVEL) * NB + tl.arange(0, NB), acc, mask=acc > 0, sem="relaxed"
    )
    if LEVEL == ALL - 1:
        # for each last digit d: this program's keys above (prefix, d) and equal to it
        part = part_ptr + ((r * S + s) * 2) * NB + tl.arange(0, NB)
        tl.store(part, tl.sum(higher, 0) + tl.sum(acc, 0) - tl.cumsum(acc, 0))
        tl.store(part + NB, acc)


@triton.jit(do_not_specialize=["L", "stride_r", "CHUNK", "S", "stride_kr", "K"])
def _write_kernel(
    s_ptr,
    begin_ptr,
    end_ptr,
    kr_ptr,
    stride_kr,
    K,
    hist_ptr,
    state_ptr,
    part_ptr,
    pos_ptr,
    valid_ptr,
    H,
    L,
    stride_r,
    CHUNK,
    S,
    SP: tl.constexpr,
    NB: tl.constexpr,
    ALL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    lo, hi, kr = row_bounds(r, H, begin_ptr, end_ptr, kr_ptr, stride_kr, K)
    if kr > 0:
        kth, need = _settle(hist_ptr, state_ptr, r, kr, ALL - 1, NB, ALL)
        # the programs before this one: their keys above the k-th, and their share of the ties (lowest first)
        sp = tl.arange(0, SP)
        before = sp < s
        counts = part_ptr + ((r * S + sp) * 2) * NB + (kth & (NB - 1))
        above = tl.load(counts, mask=before, other=0).to(tl.int64)
        tied = tl.load(counts + NB, mask=before, other=0).to(tl.int64)
        tied_before = tl.cumsum(tied, 0) - tied
        taken = tl.minimum(tl.maximum(need - tied_before, 0), tied)
        slot0 = tl.sum(above + taken, 0)
        tie0 = tl.sum(tied, 0)
        for off in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK):
            pos, inb, key, x = _block_keys(s_ptr, r, stride_r, off, L, lo, hi, BLOCK)
            is_tie = (inb & (key == kth)).to(tl.int32)  # counted in int32 scans within a block
            rank = tie0 + tl.cumsum(is_tie, 0) - 1
            chosen = (inb & (key > kth)) | ((is_tie > 0) & (rank < need))
            slot = slot0 + tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(pos_ptr + r * K + slot, pos.to(tl.int64), mask=chosen)
            tl.store(valid_ptr + r * K + slot, (x > float("-inf")).to(tl.int8), mask=chosen)
            tie0 += tl.sum(is_tie, 0)
            slot0 += tl.sum(chosen.to(tl.int32), 0)
    # the slots past the row's own k (the kr before them are all written above): position 0, not valid
    if s == 0:
        for off in range(0, K, BLOCK):
            slot = off + tl.arange(0, BLOCK)
            rest = (slot >= kr) & (slot < K)
            tl.store(pos_ptr + r * K + slot, tl.zeros((BLOCK,), tl.int64), mask=rest)
            tl.store(valid_ptr + r * K + slot, tl.zeros((BLOCK,), tl.int8), mask=rest)


def per_row(x: torch.Tensor | None, b: int, default: int, device) -> torch.Tensor:
    """0-d, [B] (any strides) or None -> a contiguous [B] int64, as the kernels index it by row."""
    if x is None:
        return torch.full((b,), default, dtype=torch.int64, device=device)
    return x.to(device, torch.int64).expand(b).contiguous()


def row_k(k_rows: torch.Tensor | None, k: int, device) -> tuple[torch.Tensor, int]:
    """Each row's own k as the kernels read it (clamping it to [0, k] themselves): (a tensor, its row stride). The
    engine's strided column of its views is read in place, no copy."""
    if k_rows is None:
        return torch.full((1,), k, dtype=torch.int64, device=device), 0
    k_rows = k_rows.to(device)
    return (k_rows.view(1), 0) if not k_rows.dim() else (k_rows, k_rows.stride(0))


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n = scores.shape
    kk = min(k, n)
    begin, end = (per_row(x, b, 0, scores.device) for x in (begin, end))
    kr, stride_kr = row_k(k_rows, kk, scores.device)
    x = scores.float().reshape(b * h, n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, dev = b * h, scores.device
    splits = max(1, min(triton.cdiv(n, _BLOCK), triton.cdiv(_TARGET_PROGRAMS, rows)))
    chunk = triton.cdiv(triton.cdiv(n, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(n, chunk)
    hist = torch.zeros(rows, _LEVELS, _NB, dtype=torch.int32, device=dev)
    state = torch.empty(rows, _LEVELS, 2, dtype=torch.int64, device=dev)
    part = torch.empty(rows, splits, 2, _NB, dtype=torch.int32, device=dev)
    positions = torch.empty(rows, kk, dtype=torch.int64, device=dev)
    valid = torch.empty(rows, kk, dtype=torch.int8, device=dev)
    grid = (rows, splits)
    common = (x, begin, end, kr, stride_kr, kk, hist, state, part)
    for level in range(_LEVELS):  # the digits from the highest
        _hist_kernel[grid](*common, h, n, x.stride(0), chunk, splits, level, _NB, _LEVELS, _BLOCK)
    _write_kernel[grid](
        *common,
        positions,
        valid,
        h,
        n,
        x.stride(0),
        chunk,
        splits,
        triton.next_power_of_2(splits),
        _NB,
        _LEVELS,
        _BLOCK,
    )
    return positions.view(b, h, kk), valid.view(torch.bool).view(b, h, kk)
