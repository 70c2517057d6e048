"""Triton version of sparse_attention.py (same function, signature and result): one program per (row, KV head)
walks the window, the generated tokens and the fetched rows in tiles, its GQA query heads sharing each tile, with
an online softmax; masked slots are never loaded. A step of few rows splits the fetched rows over programs of
their own, merged after (splits_triton). Fetched fp8 rows (host_fp8) are decoded from their bytes as they
load (integer ops: any GPU, and the interpreter)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tailorkv.kernels.splits_triton import MERGE_BLOCK, merged_row

_BLOCK_T = 32  # tokens per tile
# below this many (row, KV head) programs (batch 15 at 8 KV heads) the fetched rows get programs of their own, a few
# tiles each, beside one for the window and the generated tokens, merged after: a short step's few programs each
# walked every tile in turn
_SPLIT_PROGRAMS = 128


@triton.jit
def _tile(q, k, v, ok, m, l, acc, qk_scale):
    """Online-softmax update with one tile (scores in base 2); a tile with no valid token changes nothing."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _e4m3(b):
    """float8 e4m3fn codes (uint8) -> float32 (the codes host_fp8 writes: never NaN)."""
    b = b.to(tl.int32)
    e, m = (b >> 3) & 15, b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    return tl.where(b >= 128, -mag, mag)


@triton.jit
def _bf16_at(ptr, off, ok):
    """The little-endian bfloat16 at byte offsets `off` of a uint8 pointer, as float32 (0 where not `ok`)."""
    lo = tl.load(ptr + off, mask=ok, other=0).to(tl.int32)
    hi = tl.load(ptr + off + 1, mask=ok, other=0).to(tl.int32)
    return ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["G", "K", "swm_b", "sgr_b", "sgm_b", "S", "CHUNK"])
def _sparse_decode_kernel(
    q_ptr,
    wk_ptr,
    wv_ptr,
    slots_ptr,
    wmask_ptr,
    gk_ptr,
    gv_ptr,
    gread_ptr,
    gmask_ptr,
    f_ptr,
    valid_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    S,
    CHUNK,
    W,
    G,
    K,
    H,
    D,
    qk_scale,
    sq_b,
    sq_h,
    sw_s,
    sw_t,
    sg_t,
    swm_b,
    sgr_b,
    sgm_b,
    so_b,
    so_h,
    RW,
    GQA: tl.constexpr,
    GQA_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
    SPLIT: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    # SPLIT: split 0 takes the window and the generated tokens, split s > 0 the fetched rows [(s-1)*CHUNK, s*CHUNK)
    w_end, g_end, f_lo, f_hi = W, G, 0, K
    if SPLIT:
        s = tl.program_id(2)
        local = s == 0
        w_end, g_end = tl.where(local, W, 0), tl.where(local, G, 0)
        f_lo = tl.maximum(s - 1, 0) * CHUNK
        f_hi = tl.where(local, 0, tl.minimum(f_lo + CHUNK, K))
    i = tl.arange(0, GQA_PAD)
    d = tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    hq = h * GQA + i
    q = tl.load(
        q_ptr + b * sq_b + hq[:, None] * sq_h + d[None, :], mask=(i < GQA)[:, None] & dm, other=0.0
    )
    m = tl.full([GQA_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GQA_PAD], tl.float32)
    acc = tl.zeros([GQA_PAD, BLOCK_D], tl.float32)
    win = tl.load(slots_ptr + b).to(tl.int64) * sw_s + h * D
    for t0 in range(0, w_end, BLOCK_T):  # the sink + recent window
        t = t0 + tl.arange(0, BLOCK_T)
        ok = tl.load(wmask_ptr + b * swm_b + t, mask=t < W, other=0) != 0
        off = win + t[:, None] * sw_t + d[None, :]
        k = tl.load(wk_ptr + off, mask=ok[:, None] & dm, other=0.0)
        v = tl.load(wv_ptr + off, mask=ok[:, None] & dm, other=0.0)
        m, l, acc = _tile(q, k, v, ok, m, l, acc, qk_scale)
    for t0 in range(0, g_end, BLOCK_T):  # the generated tokens
        t = t0 + tl.arange(0, BLOCK_T)
        ok = tl.load(gmask_ptr + b * sgm_b + t, mask=t < G, other=0) != 0
        slot = tl.load(gread_ptr + b * sgr_b + t, mask=ok, other=0).to(tl.int64)
        off = slot[:, None] * sg_t + h * D + d[None, :]
        k = tl.load(gk_ptr + off, mask=ok[:, None] & dm, other=0.0)
        v = tl.load(gv_ptr + off, mask=ok[:, None] & dm, other=0.0)
        m, l, acc = _tile(q, k, v, ok, m, l, acc, qk_scale)
    # the fetched top-k rows: K then V of a token side by side
    for t0 in range(f_lo, f_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        row = (b * H + h).to(tl.int64) * K + t
        ok = tl.load(valid_ptr + row, mask=t < f_hi, other=0) != 0
        off = row[:, None] * RW + d[None, :]
        k = tl.load(f_ptr + off, mask=ok[:, None] & dm, other=0)
        v = tl.load(f_ptr + off + D, mask=ok[:, None] & dm, other=0)
        if FP8:  # codes [K | V], then the K and V scales
            k = _e4m3(k) * _bf16_at(f_ptr, row * RW + 2 * D, ok)[:, None]
            v = _e4m3(v) * _bf16_at(f_ptr, row * RW + 2 * D + 2, ok)[:, None]
        m, l, acc = _tile(q, k, v, ok, m, l, acc, qk_scale)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if SPLIT:
        # this split's part of the row's query heads, and its log-sum-exp (base 2; -inf: no key)
        row = ((b * H * GQA + hq) * S + s).to(tl.int64)
        tl.store(part_ptr + row[:, None] * D + d[None, :], out, mask=(i < GQA)[:, None] & dm)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=i < GQA)
    else:
        tl.store(
            out_ptr + b * so_b + hq[:, None] * so_h + d[None, :], out, mask=(i < GQA)[:, None] & dm
        )


@triton.jit(do_not_specialize=["S"])
def _merge_sparse_splits_kernel(
    part_ptr, part_lse_ptr, out_ptr, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    # one program per (row, query head): splits_triton.merged_row
    merged_row(part_ptr, part_lse_ptr, out_ptr, tl.program_id(0), S, D, BLOCK_S, BLOCK_D)


def sparse_decode_attention(
    q: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    slots: torch.Tensor,
    win_mask: torch.Tensor,
    gen_k: torch.Tensor,
    gen_v: torch.Tensor,
    gen_read: torch.Tensor,
    gen_mask: torch.Tensor,
    fetched: torch.Tensor,
    valid: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Same contract as sparse_attention.sparse_decode_attention."""
    b, hq, d = q.shape
    _, w, h, _ = win_k.shape
    if (
        win_k.stride() != win_v.stride()
        or gen_k.stride() != gen_v.stride()
        or win_k.stride(-1) != 1
        or gen_k.stride(-1) != 1
        or win_k.stride(2) != d
        or gen_k.stride(1) != d
    ):
        raise ValueError(
            "sparse_decode_attention: K and V of a source must share one [.., H, D] layout"
        )
    q, win_mask, gen_read, gen_mask = (x.contiguous() for x in (q, win_mask, gen_read, gen_mask))
    fetched, valid = _rows_apart(fetched), valid.contiguous()
    out = torch.empty_like(q)
    gqa = hq // h
    splits, chunk = _splits(b, h, fetched.shape[2])
    part = lse = out  # not read without splits
    if splits > 1:
        part = torch.empty(b * hq, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b * hq, splits, dtype=torch.float32, device=q.device)
    _sparse_decode_kernel[(b, h, splits)](
        q,
        win_k,
        win_v,
        slots,
        win_mask,
        gen_k,
        gen_v,
        gen_read,
        gen_mask,
        fetched,
        valid,
        out,
        part,
        lse,
        splits,
        chunk,
        w,
        gen_read.shape[1],
        fetched.shape[2],
        h,
        d,
        sm_scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        win_k.stride(0),
        win_k.stride(1),
        gen_k.stride(0),
        win_mask.stride(0),
        gen_read.stride(0),
        gen_mask.stride(0),
        out.stride(0),
        out.stride(1),
        fetched.stride(2),
        GQA=gqa,
        GQA_PAD=max(16, triton.next_power_of_2(gqa)),
        BLOCK_T=_BLOCK_T,
        BLOCK_D=triton.next_power_of_2(d),
        FP8=fetched.dtype == torch.uint8,
        SPLIT=splits > 1,
    )
    if splits > 1:
        _merge_sparse_splits_kernel[(b * hq,)](
            part, lse, out, splits, d, BLOCK_S=MERGE_BLOCK, BLOCK_D=triton.next_power_of_2(d)
        )
    return out


def _splits(b: int, h: int, k: int) -> tuple[int, int]:
    """(splits, fetched rows a split past the first): one split while b x h programs reach _SPLIT_PROGRAMS; else
    the window and generated tokens in split 0 and the k fetched rows in whole tiles over the others, enough of
    them to near _SPLIT_PROGRAMS programs (the grid depends on the shapes only: one launch a captured graph)."""
    tiles = triton.cdiv(k, _BLOCK_T)
    if b * h >= _SPLIT_PROGRAMS or not tiles:
        return 1, k
    fetched = min(tiles, max(1, triton.cdiv(_SPLIT_PROGRAMS, b * h) - 1))
    chunk = triton.cdiv(tiles, fetched) * _BLOCK_T
    return 1 + triton.cdiv(k, chunk), chunk


def _rows_apart(fetched: torch.Tensor) -> torch.Tensor:
    """fetched [B, H, K, W] whose rows may lie further apart than W (gather_rows' fp8 rows start 16 bytes apart,
    so the kernel loads them in 16-byte vectors) but are otherwise packed: as it is, else contiguous."""
    b, h, k, _ = fetched.shape
    rw = fetched.stride(2)
    packed = (
        fetched.stride(-1) == 1 and fetched.stride(1) == k * rw and fetched.stride(0) == h * k * rw
    )
    return fetched if packed else fetched.contiguous()
