"""Triton version of sketch_scores.py (same function, signature and result): one program per (row, KV head,
sketch page) scores the page's tokens on the chosen channels group by group from the packed codes, in registers
(one warp: a program's tiles are [32/bits, channels])."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailorkv.kernels.kivi import QuantizedKeys, codes_per_word
from tailorkv.kernels.kivi_triton import _unpacked
from tailorkv.kernels.sketch_scores import GROUP


@triton.jit(do_not_specialize=["NP"])
def _sketch_scores_kernel(
    q_ptr,
    ch_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    pages_ptr,
    out_ptr,
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
):
    """Bit j of word w (of a channel) is token w*PER + j: word w of the chosen channels [BLOCK_C] gives the
    scores of PER tokens through a [PER, BLOCK_C] tile; codes are never unpacked into a [tokens, D] tile. A
    channel's words are contiguous (channel-major pages): each chosen channel's are read, no other's."""
    PER: tl.constexpr = 32 // BITS
    W: tl.constexpr = GROUP // PER  # words per group and channel
    bh, n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    q = tl.load(q_ptr + bh * C + c, mask=cm, other=0.0)
    ch = tl.load(ch_ptr + bh * C + c, mask=cm, other=0)
    page = tl.load(pages_ptr + b * NP + n)
    p = tl.maximum(page, 0)
    packed = packed_ptr + p * sp_p + h * sp_h + ch * sp_d
    j = tl.arange(0, PER)
    out = out_ptr + bh * NP * T + n * T + j
    for g in tl.static_range(T // GROUP):
        srow = p * ss_p + h * ss_h + ch * ss_d + g
        qs = q * tl.load(scale_ptr + srow, mask=cm, other=0.0).to(tl.float32)
        qz = tl.sum(q * tl.load(zero_ptr + srow, mask=cm, other=0.0).to(tl.float32), axis=0)
        for w in tl.static_range(W):
            words = tl.load(packed + g * W + w, mask=cm, other=0)
            codes = (words[None, :] >> (j * BITS)[:, None]) & (2**BITS - 1)
            s = tl.sum(codes.to(tl.float32) * qs[None, :], axis=1) + qz
            tl.store(out + (g * W + w) * PER, tl.where(page >= 0, s, 0.0))


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
    b, n = pages.shape
    _, h, d, w = packed.shape
    t = w * codes_per_word(bits)
    packed, scale, zero = _unpacked(QuantizedKeys(packed, scale, zero))
    qc, channels, pages = qc.float().contiguous(), channels.contiguous(), pages.contiguous()
    out = torch.empty(b, h, n * t, dtype=torch.float32, device=qc.device)
    if out.numel():
        _sketch_scores_kernel[(b * h, n)](
            qc,
            channels,
            packed,
            scale,
            zero,
            pages,
            out,
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
            BLOCK_C=triton.next_power_of_2(channels.shape[-1]),
            num_warps=1,
        )
    return out
