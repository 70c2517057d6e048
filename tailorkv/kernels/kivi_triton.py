"""Triton KIVI kernels: same functions, signatures, layouts and results as kivi.py (the torch reference).

Quantization uses the reference's exact arithmetic (IEEE division via div_rn), so codes, scales and zeros match it
bit for bit. Decode attention dequantizes K/V tiles in registers, splits the context across programs and merges
the partial results by log-sum-exp in a second kernel. Importing this module requires triton; kivi.ops() falls back
to the reference when it is missing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tailorkv.kernels.kivi import (
    QuantizedKeys,
    QuantizedValues,
    check_group,
    codes_per_word,
    value_group,
)
from tailorkv.kernels.splits_triton import MERGE_BLOCK, merged_row

_BLOCK_D = 64  # channels per quantize-keys program
_BLOCK_ROWS = 16  # token rows per quantize-values program
_BLOCK_T = 64  # tokens per dequantize tile (capped at one key group)
_TARGET_PROGRAMS = 256  # attention programs to aim for (a few per SM) when splitting the context
# and at least this many splits a (row, KV head): at batch 12, 256 programs left 2 splits, 192 programs for 132
# SMs (H100, 2026-12-06: 10 splits 21-25% faster at 32k and 128k, 1 bit; 8 splits at batch 16 up to 11%)
_MIN_SPLITS = 8
_ATTN_WARPS, _ATTN_STAGES = 4, 3  # best of 4/8 warps x 1-3 stages at 128k tokens on an H100
# registers a thread with 16-bit queries (a 16-row query tile, head_dim <= 128): three 4-warp programs an SM where the
# compiler takes ~215 for two (H200, 2026-12-06: 6-10% faster at 32k and 128k, 14 and 16 rows, 1 and 2 bits; 160
# and 128 slower)
_ATTN_REGISTERS = 168
# tokens a paged-attention iteration dequantizes and attends (a page, or a part of one: fewer registers a thread)
_ATTN_TILE = 64


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _unpacked(
    qx: QuantizedKeys | QuantizedValues,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, scale, zero) ready for a kernel, which takes one set of strides for both scale and zero."""
    packed, scale, zero = (_last_dim_contiguous(x) for x in qx)
    if scale.stride() != zero.stride() and scale.numel():
        scale, zero = scale.contiguous(), zero.contiguous()
    return packed, scale, zero


@triton.jit
def _quantize(x, valid, lo, hi, BITS: tl.constexpr):
    """(codes int32 shaped like x, scale fp16, zero fp16) for x whose group min/max are lo/hi (broadcastable)."""
    scale = ((hi - lo) * (1.0 / (2**BITS - 1))).to(tl.float16)
    zero = lo.to(tl.float16)
    s = scale.to(tl.float32)
    y = tl.where(s > 0, tl.math.div_rn(x - zero.to(tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), 2**BITS - 1).to(tl.int32)
    return tl.where(valid, q, 0), scale, zero


@triton.jit
def _codes_f16(codes):
    """Codes (int32 in [0, 2^BITS)) as float16 without a conversion instruction (quarter rate on the H100, two an
    element where the codes went to float32 and the dequantized values to the dot's 16 bits): the bits 0x6400 | code
    are float16 1024 + code exactly, less 1024."""
    return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def codes_f32(codes):
    """Codes (int32 in [0, 2^23)) as float32, exactly, without a conversion instruction: the bits 0x4B000000 | code
    are float32 2^23 + code, less 2^23."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_key_tile(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    sp_t,
    ss_t,
    t0,
    T,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The packed keys of tokens t0 ... of one head (pointers at the head), as stored: (words [BLOCK_T / (32 / BITS),
    BLOCK_D] int32, scale, zero [BLOCK_D] fp16). t0 is a multiple of BLOCK_T, which divides GROUP: one scale/zero
    row. T <= t0 loads nothing (a tile to prefetch past the end)."""
    PER: tl.constexpr = 32 // BITS
    w = t0 // PER + tl.arange(0, BLOCK_T // PER)
    d = tl.arange(0, BLOCK_D)
    words = tl.load(
        packed_ptr + w[:, None] * sp_t + d[None, :],
        mask=(w * PER < T)[:, None] & (d < D)[None, :],
        other=0,
    )
    row = (t0 // GROUP) * ss_t + d
    ok = d < tl.where(t0 < T, D, 0)  # a tile past the quantized tokens has no scale row to read
    scale = tl.load(scale_ptr + row, mask=ok, other=0.0)
    zero = tl.load(zero_ptr + row, mask=ok, other=0.0)
    return words, scale, zero


@triton.jit
def _dequantize_key_tile(
    words,
    scale,
    zero,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    F16: tl.constexpr,
):
    """Keys [BLOCK_T, BLOCK_D] from _load_key_tile's words, scale and zero, float32 or with F16 float16 (codes * scale
    + zero in float16: both are float16 already and the values lie between a group's float16 extremes). Entries
    past T or D are meaningless."""
    PER: tl.constexpr = 32 // BITS
    codes = tl.reshape(
        (words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & (2**BITS - 1),
        [BLOCK_T, BLOCK_D],
    )
    # one return: the compiler visits every return statement and needs their types to agree
    if F16:
        x = _codes_f16(codes) * scale[None, :] + zero[None, :]
    else:
        x = codes_f32(codes) * scale.to(tl.float32)[None, :] + zero.to(tl.float32)[None, :]
    return x


@triton.jit
def _load_value_tile(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    p_row,
    s_row,
    rows_ok,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The packed values of BLOCK_R token rows (p_row / s_row: each row's offset into packed / scale), as stored:
    (words [BLOCK_R, BLOCK_D / (32 / BITS)] int32, scale, zero [BLOCK_R, BLOCK_D / GROUP] fp16); rows not `rows_ok`
    load nothing."""
    PER: tl.constexpr = 32 // BITS
    w = tl.arange(0, BLOCK_D // PER)
    words = tl.load(
        packed_ptr + p_row[:, None] + w[None, :],
        mask=rows_ok[:, None] & (w * PER < D)[None, :],
        other=0,
    )
    g = tl.arange(0, BLOCK_D // GROUP)
    off = s_row[:, None] + g[None, :]
    ok = rows_ok[:, None] & (g * GROUP < D)[None, :]
    scale = tl.load(scale_ptr + off, mask=ok, other=0.0)
    zero = tl.load(zero_ptr + off, mask=ok, other=0.0)
    return words, scale, zero


@triton.jit
def _dequantize_value_tile(
    words,
    scale,
    zero,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    F16: tl.constexpr,
):
    """Values [BLOCK_R, BLOCK_D] from _load_value_tile's words, scale and zero, float32 or with F16 float16 (as
    _dequantize_key_tile). Entries of rows not loaded or past D are meaningless."""
    PER: tl.constexpr = 32 // BITS
    codes = tl.reshape(
        (words[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & (2**BITS - 1),
        [BLOCK_R, BLOCK_D],
    )
    if not F16:
        scale, zero = scale.to(tl.float32), zero.to(tl.float32)
    scale = tl.reshape(
        tl.broadcast_to(scale[:, :, None], [BLOCK_R, BLOCK_D // GROUP, GROUP]), [BLOCK_R, BLOCK_D]
    )
    zero = tl.reshape(
        tl.broadcast_to(zero[:, :, None], [BLOCK_R, BLOCK_D // GROUP, GROUP]), [BLOCK_R, BLOCK_D]
    )
    if F16:
        x = _codes_f16(codes) * scale + zero
    else:
        x = codes_f32(codes) * scale + zero
    return x


@triton.jit(do_not_specialize=["T", "W", "G"])
def _quantize_keys_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    T,
    D,
    W,
    G,
    sx_n,
    sx_t,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program per (head, token group, channel block); the group's tokens are viewed as [words, codes/word]
    n, g, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    w = g * (GROUP // PER) + tl.arange(0, GROUP // PER)
    j = tl.arange(0, PER)
    t = (w[:, None] * PER + j[None, :])[:, :, None]
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tok = t < T
    x = tl.load(
        x_ptr + n * sx_n + t * sx_t + d[None, None, :], mask=tok & (d < D)[None, None, :], other=0.0
    ).to(tl.float32)
    lo = tl.min(tl.min(tl.where(tok, x, float("inf")), axis=1), axis=0)
    hi = tl.max(tl.max(tl.where(tok, x, float("-inf")), axis=1), axis=0)
    code, scale, zero = _quantize(x, tok, lo[None, None, :], hi[None, None, :], BITS)
    words = tl.sum(
        code << (j * BITS)[None, :, None], axis=1
    )  # disjoint bits: the int32 sum is the OR, exactly
    tl.store(
        packed_ptr + (n * W + w[:, None]) * D + d[None, :],
        words,
        mask=(w < W)[:, None] & (d < D)[None, :],
    )
    s_off = (n * G + g) * D + d
    tl.store(scale_ptr + s_off, tl.reshape(scale, [BLOCK_D]), mask=d < D)
    tl.store(zero_ptr + s_off, tl.reshape(zero, [BLOCK_D]), mask=d < D)


@triton.jit(do_not_specialize=["rows", "T"])
def _quantize_values_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    rows,
    T,
    D,
    sx_n,
    sx_t,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    # one program per (block of token rows, channel group); the group's channels are viewed as [words, codes/word]
    pid_r, g = tl.program_id(0), tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = GROUP // PER
    r = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    w = tl.arange(0, WORDS)
    j = tl.arange(0, PER)
    c = g * GROUP + w[:, None] * PER + j[None, :]
    row_ok = (r < rows)[:, None, None]
    x = tl.load(
        x_ptr + ((r // T) * sx_n + (r % T) * sx_t)[:, None, None] + c[None, :, :],
        mask=row_ok,
        other=0.0,
    ).to(tl.float32)
    lo = tl.min(tl.min(x, axis=2), axis=1)
    hi = tl.max(tl.max(x, axis=2), axis=1)
    code, scale, zero = _quantize(x, row_ok, lo[:, None, None], hi[:, None, None], BITS)
    words = tl.sum(
        code << j[None, None, :] * BITS, axis=2
    )  # disjoint bits: the int32 sum is the OR
    tl.store(
        packed_ptr + r[:, None] * (D // PER) + g * WORDS + w[None, :],
        words,
        mask=(r < rows)[:, None],
    )
    tl.store(scale_ptr + r * (D // GROUP) + g, tl.reshape(scale, [BLOCK_ROWS]), mask=r < rows)
    tl.store(zero_ptr + r * (D // GROUP) + g, tl.reshape(zero, [BLOCK_ROWS]), mask=r < rows)


@triton.jit(do_not_specialize=["T"])
def _dequantize_keys_kernel(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    T,
    D,
    sp_n,
    sp_t,
    ss_n,
    ss_t,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n, pid_t = tl.program_id(0), tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    words, scale, zero = _load_key_tile(
        packed_ptr + n * sp_n,
        scale_ptr + n * ss_n,
        zero_ptr + n * ss_n,
        sp_t,
        ss_t,
        pid_t * BLOCK_T,
        T,
        D,
        BITS,
        GROUP,
        BLOCK_T,
        BLOCK_D,
    )
    x = _dequantize_key_tile(words, scale, zero, BITS, BLOCK_T, BLOCK_D, False)
    tl.store(
        out_ptr + (n * T + t[:, None]) * D + d[None, :], x, mask=(t < T)[:, None] & (d < D)[None, :]
    )


@triton.jit(do_not_specialize=["rows", "T"])
def _dequantize_values_kernel(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    rows,
    T,
    D,
    sp_n,
    sp_t,
    ss_n,
    ss_t,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    n, t = r // T, r % T
    words, scale, zero = _load_value_tile(
        packed_ptr,
        scale_ptr,
        zero_ptr,
        n * sp_n + t * sp_t,
        n * ss_n + t * ss_t,
        r < rows,
        D,
        BITS,
        GROUP,
        BLOCK_R,
        BLOCK_D,
    )
    x = _dequantize_value_tile(words, scale, zero, BITS, GROUP, BLOCK_R, BLOCK_D, False)
    tl.store(out_ptr + r[:, None] * D + d[None, :], x, mask=(r < rows)[:, None] & (d < D)[None, :])


@triton.jit
def _attend_tile(q, k, v, valid, m, l, acc, qk_scale):
    """Online-softmax update of (running max m, sum l, output acc) with one tile; scores in base 2."""
    # products in q's dtype: tensor cores for 16-bit queries, exact fp32 FMAs for fp32 ones
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds at least one token
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _load_page_tile(
    kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, skp_p, skp_h, skp_w, sks_p, sks_h, svp_t, svp_h, svs_t, svs_h,
    kvh, page, t0, kend, vq, D, BITS: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr, VGROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The packed keys' and values' loads (_load_key_tile's, then _load_value_tile's) of the TILE tokens t0 ... in
    page `page`, whose keys are packed below kend; a tile at or past kend loads nothing."""
    kp, ks, kz = _load_key_tile(
        kp_ptr + page * skp_p + kvh * skp_h,
        ks_ptr + page * sks_p + kvh * sks_h,
        kz_ptr + page * sks_p + kvh * sks_h,
        skp_w,
        0,
        t0 % PAGE,
        tl.where(t0 < kend, PAGE, 0),
        D,
        BITS,
        PAGE,
        TILE,
        BLOCK_D,
    )
    t = t0 + tl.arange(0, TILE)
    vp, vs, vz = _load_page_values(
        vp_ptr, vs_ptr, vz_ptr, svp_t, svp_h, svs_t, svs_h, kvh, page, t, (t < kend) & (t < vq), D, BITS, PAGE,
        TILE, VGROUP, BLOCK_D,
    )  # fmt: skip
    return kp, ks, kz, vp, vs, vz


@triton.jit
def _load_page_values(
    vp_ptr, vs_ptr, vz_ptr, svp_t, svp_h, svs_t, svs_h, kvh, page, t, rows_ok, D, BITS: tl.constexpr,
    PAGE: tl.constexpr, TILE: tl.constexpr, VGROUP: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """_load_value_tile's loads of tokens t (TILE of them, in page `page`) where rows_ok."""
    vslot = page * PAGE + (t % PAGE)
    return _load_value_tile(
        vp_ptr + kvh * svp_h,
        vs_ptr + kvh * svs_h,
        vz_ptr + kvh * svs_h,
        vslot * svp_t,
        vslot * svs_t,
        rows_ok,
        D,
        BITS,
        VGROUP,
        TILE,
        BLOCK_D,
    )


@triton.jit
def _window_values(
    v, vw_ptr, slot, kvh, t0, t, valid, vq, RW, svw_s, svw_r, svw_h, d, D, TILE: tl.constexpr
):
    """The tile's values v, those of its tokens at or past vq (not yet packed) from the V window (a ring)."""
    # only the last tiles reach them: the others skip the window's addresses, loads and select
    if t0 + TILE > vq:
        win = (t % RW).to(tl.int64)
        v_win = tl.load(
            vw_ptr + slot * svw_s + win[:, None] * svw_r + kvh * svw_h + d[None, :],
            mask=(valid & (t >= vq))[:, None] & (d < D)[None, :],
            other=0.0,
        ).to(v.dtype)
        v = tl.where((valid & (t < vq))[:, None], v, v_win)
    return v


@triton.jit(do_not_specialize=["chunk", "num_splits", "sp_b"])
def _paged_decode_kernel(
    q_ptr,
    kp_ptr,
    ks_ptr,
    kz_ptr,
    vp_ptr,
    vs_ptr,
    vz_ptr,
    kt_ptr,
    vw_ptr,
    pages_ptr,
    slots_ptr,
    len_ptr,
    members_ptr,
    shared_ptr,
    out_ptr,
    lse_ptr,
    H,
    D,
    RW,
    chunk,
    num_splits,
    qk_scale,
    sq_b,
    sq_h,
    skp_p,
    skp_h,
    skp_w,
    sks_p,
    sks_h,
    svp_t,
    svp_h,
    svs_t,
    svs_h,
    skt_s,
    skt_r,
    skt_h,
    svw_s,
    svw_r,
    svw_h,
    sp_b,
    GQA: tl.constexpr,
    GQA_PAD: tl.constexpr,
    G: tl.constexpr,
    SHARE: tl.constexpr,
    BITS: tl.constexpr,
    PAGE: tl.constexpr,
    TILE: tl.constexpr,
    VGROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    F16: tl.constexpr,
):
    # one program per (sequence, KV head, split of `chunk` tokens), its GQA query heads sharing each dequantized
    # tile of one page; a split past the sequence's length writes an empty part (lse -inf). SHARE: a split that
    # lies inside the prefix a group of up to G rows shares (members[b]: the group's rows, its first one leading;
    # shared[b]: the prefix's tokens, every one of them in the same pages, packed) is attended once, by the leader's
    # program, its query tile holding every member's heads (query row i: member i // GQA, head i % GQA); the other
    # members' programs for it write nothing
    bh, split = tl.program_id(0), tl.program_id(1)
    b, kvh = bh // H, bh % H
    # int32 like the split bounds: a loop's bounds share one type
    n = tl.load(len_ptr + b * 3).to(tl.int32)
    kq = tl.load(len_ptr + b * 3 + 1).to(tl.int32)
    vq = tl.load(len_ptr + b * 3 + 2).to(tl.int32)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    i = tl.arange(0, GQA_PAD)
    d = tl.arange(0, BLOCK_D)
    j, head = i // GQA, i % GQA
    member = tl.where(j == 0, b, -1).to(tl.int64)  # the row of each query row's member (-1: none)
    active = True  # a constexpr: without SHARE the launch compiles as before, no branch
    if SHARE:
        shared = split * chunk + chunk <= tl.load(shared_ptr + b)
        active = (shared == 0) | (tl.load(members_ptr + b * G) == b)
        group = tl.load(members_ptr + b * G + j, mask=j < G, other=-1).to(tl.int64)
        member = tl.where(shared, group, member)
    if active:
        _paged_decode_split(
            q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, kt_ptr, vw_ptr, pages_ptr, out_ptr, lse_ptr,
            H, D, RW, chunk, num_splits, qk_scale, sq_b, sq_h, skp_p, skp_h, skp_w, sks_p, sks_h, svp_t, svp_h,
            svs_t, svs_h, skt_s, skt_r, skt_h, svw_s, svw_r, svw_h, sp_b, b, kvh, split, n, kq, vq, slot, member,
            head, d, GQA, GQA_PAD, BITS, PAGE, TILE, VGROUP, BLOCK_D, F16,
        )  # fmt: skip


@triton.jit
def _paged_decode_split(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, kt_ptr, vw_ptr, pages_ptr, out_ptr, lse_ptr,
    H, D, RW, chunk, num_splits, qk_scale, sq_b, sq_h, skp_p, skp_h, skp_w, sks_p, sks_h, svp_t, svp_h,
    svs_t, svs_h, skt_s, skt_r, skt_h, svw_s, svw_r, svw_h, sp_b, b, kvh, split, n, kq, vq, slot, member,
    head, d, GQA: tl.constexpr, GQA_PAD: tl.constexpr, BITS: tl.constexpr, PAGE: tl.constexpr,
    TILE: tl.constexpr, VGROUP: tl.constexpr, BLOCK_D: tl.constexpr, F16: tl.constexpr,
):  # fmt: skip
    """Row b's split `split` over its pages and tails, for the query rows of `member` (their rows) and `head`.
    F16 (16-bit queries): the tiles, the query and the dots in float16 (queries, keys and values of a model in
    bfloat16 are assumed within float16's range); else float32 throughout."""
    q_ok = member >= 0
    head_ok = q_ok[:, None] & (d < D)[None, :]
    q = tl.load(
        q_ptr + member[:, None] * sq_b + (kvh * GQA + head)[:, None] * sq_h + d[None, :],
        mask=head_ok,
        other=0.0,
    )
    if F16:
        q = q.to(tl.float16)
    m = tl.full([GQA_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GQA_PAD], tl.float32)
    acc = tl.zeros([GQA_PAD, BLOCK_D], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    # TILE tokens of one page at a time. First the tiles whose keys are all packed (kq is a multiple of PAGE), below
    # kend, by hand in a pipeline: a tile's page id is loaded two tiles ahead and its words, scales and zeros one
    # tile ahead, in flight while the tile before it is dequantized and attended; the loads for the tile past kend
    # read nothing, and its page-table column is clamped to the last tile's
    kend = tl.minimum(end, kq)
    last = tl.maximum(kend - 1, start) // PAGE
    table = pages_ptr + b * sp_b  # row b's page ids
    page = tl.load(table + start // PAGE).to(tl.int64)
    kp, ks, kz, vp, vs, vz = _load_page_tile(
        kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, skp_p, skp_h, skp_w, sks_p, sks_h, svp_t, svp_h, svs_t,
        svs_h, kvh, page, start, kend, vq, D, BITS, PAGE, TILE, VGROUP, BLOCK_D,
    )  # fmt: skip
    page = tl.load(table + tl.minimum((start + TILE) // PAGE, last)).to(tl.int64)
    for t0 in range(start, kend, TILE):
        kp_next, ks_next, kz_next, vp_next, vs_next, vz_next = _load_page_tile(
            kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, skp_p, skp_h, skp_w, sks_p, sks_h, svp_t, svp_h, svs_t,
            svs_h, kvh, page, t0 + TILE, kend, vq, D, BITS, PAGE, TILE, VGROUP, BLOCK_D,
        )  # fmt: skip
        page = tl.load(table + tl.minimum((t0 + 2 * TILE) // PAGE, last)).to(tl.int64)
        t = t0 + tl.arange(0, TILE)
        valid = t < end
        k = _dequantize_key_tile(kp, ks, kz, BITS, TILE, BLOCK_D, F16)
        v = _dequantize_value_tile(vp, vs, vz, BITS, VGROUP, TILE, BLOCK_D, F16)
        v = _window_values(
            v, vw_ptr, slot, kvh, t0, t, valid, vq, RW, svw_s, svw_r, svw_h, d, D, TILE
        )
        m, l, acc = _attend_tile(q, k, v, valid, m, l, acc, qk_scale)
        kp, ks, kz, vp, vs, vz = kp_next, ks_next, kz_next, vp_next, vs_next, vz_next
    # then the tiles whose keys are in the full-precision tail, at the sequence's end
    for t0 in range(tl.maximum(start, kq), end, TILE):
        t = t0 + tl.arange(0, TILE)
        valid = t < end
        page = tl.load(table + t0 // PAGE).to(tl.int64)
        tail = (t - kq).to(tl.int64)
        k = tl.load(
            kt_ptr + slot * skt_s + tail[:, None] * skt_r + kvh * skt_h + d[None, :],
            mask=valid[:, None] & (d < D)[None, :],
            other=0.0,
        ).to(q.dtype)
        words, scale, zero = _load_page_values(
            vp_ptr, vs_ptr, vz_ptr, svp_t, svp_h, svs_t, svs_h, kvh, page, t, valid & (t < vq), D, BITS, PAGE,
            TILE, VGROUP, BLOCK_D,
        )  # fmt: skip
        v = _dequantize_value_tile(words, scale, zero, BITS, VGROUP, TILE, BLOCK_D, F16)
        v = _window_values(
            v, vw_ptr, slot, kvh, t0, t, valid, vq, RW, svw_s, svw_r, svw_h, d, D, TILE
        )
        m, l, acc = _attend_tile(q, k, v, valid, m, l, acc, qk_scale)
    row = (member * H * GQA + kvh * GQA + head) * num_splits + split
    nonempty = l > 0
    tl.store(
        out_ptr + row[:, None] * D + d[None, :],
        acc / tl.where(nonempty, l, 1.0)[:, None],
        mask=head_ok,
    )
    tl.store(
        lse_ptr + row,
        tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf")),
        mask=q_ok,
    )


@triton.jit(do_not_specialize=["S"])
def _merge_splits_kernel(
    part_ptr, part_lse_ptr, out_ptr, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    # one program per query head (splits_triton.merged_row)
    merged_row(part_ptr, part_lse_ptr, out_ptr, tl.program_id(0), S, D, BLOCK_S, BLOCK_D)


def quantize_keys(k: torch.Tensor, bits: int, group: int = 64) -> QuantizedKeys:
    """Same contract as kivi.quantize_keys."""
    check_group(bits, group)
    k = _last_dim_contiguous(k)
    n, t, d = k.shape
    words, groups = triton.cdiv(t, codes_per_word(bits)), triton.cdiv(t, group)
    packed = torch.empty(n, words, d, dtype=torch.int32, device=k.device)
    scale = torch.empty(n, groups, d, dtype=torch.float16, device=k.device)
    zero = torch.empty_like(scale)
    if packed.numel():
        _quantize_keys_kernel[(n, groups, triton.cdiv(d, _BLOCK_D))](
            k,
            packed,
            scale,
            zero,
            t,
            d,
            words,
            groups,
            k.stride(0),
            k.stride(1),
            BITS=bits,
            GROUP=group,
            BLOCK_D=_BLOCK_D,
        )
    return QuantizedKeys(packed, scale, zero)


def dequantize_keys(
    qk: QuantizedKeys, bits: int, group: int, num_tokens: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Same contract as kivi.dequantize_keys."""
    check_group(bits, group)
    packed, scale, zero = _unpacked(qk)
    n, _, d = packed.shape
    out = torch.empty(n, num_tokens, d, dtype=dtype, device=packed.device)
    block_t = min(_BLOCK_T, group)
    if out.numel():
        _dequantize_keys_kernel[(n, triton.cdiv(num_tokens, block_t))](
            packed,
            scale,
            zero,
            out,
            num_tokens,
            d,
            packed.stride(0),
            packed.stride(1),
            scale.stride(0),
            scale.stride(1),
            BITS=bits,
            GROUP=group,
            BLOCK_T=block_t,
            BLOCK_D=triton.next_power_of_2(d),
        )
    return out


def quantize_values(v: torch.Tensor, bits: int, group: int = 64) -> QuantizedValues:
    """Same contract as kivi.quantize_values."""
    v = _last_dim_contiguous(v)
    n, t, d = v.shape
    group = value_group(group, d, bits)
    packed = torch.empty(n, t, d // codes_per_word(bits), dtype=torch.int32, device=v.device)
    scale = torch.empty(n, t, d // group, dtype=torch.float16, device=v.device)
    zero = torch.empty_like(scale)
    if packed.numel():
        _quantize_values_kernel[(triton.cdiv(n * t, _BLOCK_ROWS), d // group)](
            v,
            packed,
            scale,
            zero,
            n * t,
            t,
            d,
            v.stride(0),
            v.stride(1),
            BITS=bits,
            GROUP=group,
            BLOCK_ROWS=_BLOCK_ROWS,
        )
    return QuantizedValues(packed, scale, zero)


def dequantize_values(
    qv: QuantizedValues, bits: int, group: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Same contract as kivi.dequantize_values."""
    packed, scale, zero = _unpacked(qv)
    n, t, words = packed.shape
    d = words * codes_per_word(bits)
    group = value_group(group, d, bits)
    out = torch.empty(n, t, d, dtype=dtype, device=packed.device)
    if out.numel():
        _dequantize_values_kernel[(triton.cdiv(n * t, _BLOCK_T),)](
            packed,
            scale,
            zero,
            out,
            n * t,
            t,
            d,
            packed.stride(0),
            packed.stride(1),
            scale.stride(0),
            scale.stride(1),
            BITS=bits,
            GROUP=group,
            BLOCK_R=_BLOCK_T,
            BLOCK_D=triton.next_power_of_2(d),
        )
    return out


def context_splits(tiles: int, pairs: int, target_programs: int | None = None) -> tuple[int, int]:
    """(pages per split, splits) of a page table `tiles` pages wide over `pairs` (row, KV head) programs: whole
    pages per split, enough splits for about `target_programs` programs (default: _TARGET_PROGRAMS, or
    _MIN_SPLITS a pair where that is more)."""
    target = target_programs or max(_TARGET_PROGRAMS, _MIN_SPLITS * pairs)
    per = max(1, triton.cdiv(tiles, max(1, target // max(1, pairs))))
    return per, triton.cdiv(tiles, per)


def paged_decode_attention(
    q: torch.Tensor,
    k_packed: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_packed: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_tail: torch.Tensor,
    v_win: torch.Tensor,
    pages: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    bits: int,
    sm_scale: float,
    *,
    members: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
    target_programs: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tile: int | None = None,
    max_registers: int | None = None,
) -> torch.Tensor:
    """Same contract as kivi.paged_decode_attention. The grid depends on the shapes only (pages' width sets the
    splits), never on the lengths: one launch replays in a CUDA graph for any lengths that fit the page table.
    `members` [B, G] and `shared` [B]: the splits inside a shared prefix are attended once a group, by its leader's
    program with every member's query heads (G * GQA query rows a tile, padded to 16 or the next power of 2). The
    last keywords tune the launch (benchmarks/bench_q_attention.py sweeps them; default: the module's settings;
    max_registers: a cap on registers a thread, 0 none; default _ATTN_REGISTERS at the shape it was measured at)."""
    bsz, hq, d = q.shape
    _, h, w, _ = k_packed.shape
    page = w * codes_per_word(bits)
    check_group(bits, page)
    vgroup = d // v_scale.shape[-1]
    tile = min(page, tile or _ATTN_TILE)
    if page % tile or tile % codes_per_word(bits) or tile < 16:
        raise ValueError(
            f"tile {tile}: must divide the {page}-token page, hold whole {bits}-bit words, be >= 16"
        )
    q, k_tail, v_win = (_last_dim_contiguous(x) for x in (q, k_tail, v_win))
    k_packed, k_scale, k_zero = _unpacked(
        (k_packed, k_scale, k_zero)
    )  # scale and zero share strides in the kernel
    v_packed, v_scale, v_zero = _unpacked((v_packed, v_scale, v_zero))
    share = members is not None
    g = members.shape[1] if share else 1
    # splits for the programs that do the work when every group is full: the leaders' shared splits (with splits
    # for all rows, the leaders' programs ran as long as before and the members' idled: no time saved on the H100)
    per, splits = context_splits(pages.shape[1], triton.cdiv(bsz, g) * h, target_programs)
    chunk = per * page
    part = torch.empty(bsz * hq, splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(bsz * hq, splits, dtype=torch.float32, device=q.device)
    pages, slots, lengths = pages.contiguous(), slots.contiguous(), lengths.contiguous()
    if share:
        members, shared = members.contiguous(), shared.contiguous()
    else:  # not read
        members = shared = lengths
    f16 = q.dtype in (torch.float16, torch.bfloat16)
    gqa_pad = max(16, triton.next_power_of_2(g * (hq // h)))
    # the cap where it was measured: 16-bit queries, a 16-row query tile, head_dim up to 128
    measured = f16 and gqa_pad == 16 and d <= 128
    regs = (_ATTN_REGISTERS if measured else 0) if max_registers is None else max_registers
    _paged_decode_kernel[(bsz * h, splits)](
        q,
        k_packed,
        k_scale,
        k_zero,
        v_packed,
        v_scale,
        v_zero,
        k_tail,
        v_win,
        pages,
        slots,
        lengths,
        members,
        shared,
        part,
        part_lse,
        h,
        d,
        v_win.shape[1],
        chunk,
        splits,
        sm_scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k_packed.stride(0),
        k_packed.stride(1),
        k_packed.stride(2),
        k_scale.stride(0),
        k_scale.stride(1),
        v_packed.stride(0),
        v_packed.stride(1),
        v_scale.stride(0),
        v_scale.stride(1),
        k_tail.stride(0),
        k_tail.stride(1),
        k_tail.stride(2),
        v_win.stride(0),
        v_win.stride(1),
        v_win.stride(2),
        pages.stride(0),
        GQA=hq // h,
        GQA_PAD=gqa_pad,
        G=g,
        SHARE=share,
        BITS=bits,
        PAGE=page,
        TILE=tile,
        VGROUP=vgroup,
        BLOCK_D=triton.next_power_of_2(d),
        F16=f16,
        num_warps=num_warps or _ATTN_WARPS,
        num_stages=num_stages or _ATTN_STAGES,
        **({"maxnreg": regs} if regs else {}),
    )
    out = torch.empty(bsz * hq, d, dtype=torch.float32, device=q.device)
    _merge_splits_kernel[(bsz * hq,)](
        part, part_lse, out, splits, d, BLOCK_S=MERGE_BLOCK, BLOCK_D=triton.next_power_of_2(d)
    )
    return out.view(bsz, hq, d)
