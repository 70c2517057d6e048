"""Triton version of sketch_scores.py (same function, signature and result): one program per (row, KV head,
sketch page) scores the page's tokens on the chosen channels from the packed codes, in registers: one warp, a
[channels, words, 32/bits] tile of codes, a few channels at a time, whose words it loads as vectors and whose T
scores it stores at once in 16-byte vectors (the former kernel stored them 4 bytes a thread, 16 stores a page)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailorkv.kernels.block_maxima_triton import block_maxima
from tailorkv.kernels.kivi import QuantizedKeys, codes_per_word
from tailorkv.kernels.kivi_triton import _unpacked, codes_f32
from tailorkv.kernels.sketch_scores import GROUP
from tailorkv.kernels.token_topk_triton import per_row

# channels a tile unpacks at once: at 2 bits, 4 take 74 registers a thread (8 would take 124: half the warps an SM
# holds; ptxas for sm_90), with 16-byte score stores and 8-byte word loads
_CHANNELS_PER_TILE = 4


@triton.jit(do_not_specialize=["NP"])
def _sketch_scores_kernel(
    q_ptr,
    ch_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    pages_ptr,
    out_ptr,
    begin_ptr,
    end_ptr,
    max_ptr,
    H,
    C,
    NP,
    sp_p,
    sp_h,
    sp_d,
    ss_p,
    ss_h,
    ss_d,
    T: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Bit j of word w (of a channel) is token w*PER + j. The page's words of BLOCK_C chosen channels at a time
    ([BLOCK_C, NW]: a channel's are contiguous, channel-major pages) give all its T scores as one [NW, PER] tile,
    stored at once; codes are never unpacked into a [tokens, D] tile. CHUNK > 0 (it divides T): also the maxima of
    the page's CHUNK-token blocks, positions outside the row's [begin, end) left out, as block_maxima computes them
    from the stored scores."""
    PER: tl.constexpr = 32 // BITS
    NW: tl.constexpr = T // PER  # words per channel and page
    W: tl.constexpr = GROUP // PER  # words per group
    bh, n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    page = tl.load(pages_ptr + b * NP + n)
    p = tl.maximum(page, 0)
    # padding (a captured step's rows past its requests, pages past a row's) reads no channel
    live = page >= 0
    nc = tl.where(live, C, 0)
    w = tl.arange(0, NW)
    j = tl.arange(0, PER)
    s = tl.zeros([NW, PER], tl.float32)
    qz = tl.zeros([NW], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < nc
        q = tl.load(q_ptr + bh * C + c, mask=cm, other=0.0)
        ch = tl.load(ch_ptr + bh * C + c, mask=cm, other=0)
        words = tl.load(
            packed_ptr + p * sp_p + h * sp_h + ch[:, None] * sp_d + w[None, :],
            mask=cm[:, None],
            other=0,
        )
        # each word's group: its scale and zero per channel, [BLOCK_C, NW]
        srow = p * ss_p + h * ss_h + ch[:, None] * ss_d + (w // W)[None, :]
        scale = tl.load(scale_ptr + srow, mask=cm[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + srow, mask=cm[:, None], other=0.0).to(tl.float32)
        codes = (words[:, :, None] >> (j * BITS)[None, None, :]) & (2**BITS - 1)
        s += tl.sum(codes_f32(codes) * (q[:, None] * scale)[:, :, None], axis=0)
        qz += tl.sum(q[:, None] * zero, axis=0)
    out = out_ptr + bh * NP * T + n * T + w[:, None] * PER + j[None, :]
    s = tl.where(live, s + qz[:, None], 0.0)
    tl.store(out, s)
    if CHUNK > 0:
        pos = n * T + w[:, None] * PER + j[None, :]
        inside = (pos >= tl.load(begin_ptr + b)) & (pos < tl.load(end_ptr + b))
        x = tl.reshape(tl.where(inside, s, float("-inf")), [T // CHUNK, CHUNK])
        blk = tl.arange(0, T // CHUNK)
        tl.store(max_ptr + bh * NP * (T // CHUNK) + n * (T // CHUNK) + blk, tl.max(x, axis=1))


def sketch_scores(
    qc: torch.Tensor,
    channels: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    pages: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Same contract as sketch_scores.sketch_scores."""
    return _launch(qc, channels, packed, scale, zero, pages, bits)[0]


def sketch_scores_and_maxima(
    qc: torch.Tensor,
    channels: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    pages: torch.Tensor,
    bits: int,
    begin: torch.Tensor,
    end: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as sketch_scores.sketch_scores_and_maxima: the maxima in the same launch where `chunk` is a
    power of two dividing a page's tokens (the scores are not read back), else block_maxima's kernel after it."""
    t = packed.shape[-1] * codes_per_word(bits)
    if chunk & (chunk - 1) or t % chunk:
        scores = sketch_scores(qc, channels, packed, scale, zero, pages, bits)
        return scores, block_maxima(scores, begin, end, chunk)
    return _launch(qc, channels, packed, scale, zero, pages, bits, begin, end, chunk)


def _launch(qc, channels, packed, scale, zero, pages, bits, begin=None, end=None, chunk=0):
    b, n = pages.shape
    _, h, d, w = packed.shape
    t = w * codes_per_word(bits)
    packed, scale, zero = _unpacked(QuantizedKeys(packed, scale, zero))
    qc, channels, pages = qc.float().contiguous(), channels.contiguous(), pages.contiguous()
    out = torch.empty(b, h, n * t, dtype=torch.float32, device=qc.device)
    if chunk:  # one range per row: a 0-d range stands for every one
        maxima = torch.empty(b, h, n * t // chunk, dtype=torch.float32, device=qc.device)
        begin, end = (per_row(x, b, 0, qc.device) for x in (begin, end))
    else:  # not read
        maxima, begin, end = out, pages, pages
    if out.numel():
        _sketch_scores_kernel[(b * h, n)](
            qc,
            channels,
            packed,
            scale,
            zero,
            pages,
            out,
            begin,
            end,
            maxima,
            h,
            channels.shape[-1],
            n,
            packed.stride(0),
            packed.stride(1),
            packed.stride(2),
            scale.stride(0),
            scale.stride(1),
            scale.stride(2),
            T=t,
            BITS=bits,
            GROUP=GROUP,
            BLOCK_C=min(_CHANNELS_PER_TILE, triton.next_power_of_2(channels.shape[-1])),
            CHUNK=chunk,
            num_warps=1,
        )
    return out, maxima
