"""Triton version of sketch_scores.py (same function, signature and result): one program per (row, KV head,
sketch page) scores the page's tokens group by group from the packed codes, in registers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailorkv.kernels.kivi import QuantizedKeys, codes_per_word
from tailorkv.kernels.kivi_triton import _unpacked
from tailorkv.kernels.sketch_scores import GROUP


@triton.jit
def _sketch_scores_kernel(q_ptr, packed_ptr, scale_ptr, zero_ptr, pages_ptr, out_ptr, H, D, NP,
                          sp_p, sp_h, sp_t, ss_p, ss_h, ss_t,
                          T: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Codes are never unpacked into a [tokens, D] tile: bit j of word w is token w*PER + j, so a group's scores
    are sum_d (q*scale)[d] * code[j, w, d] + sum_d (q*zero)[d] over a [PER, W, D] view, stored at those tokens."""
    PER: tl.constexpr = 32 // BITS
    W: tl.constexpr = GROUP // PER  # words per group and channel
    bh, n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + bh * D + d, mask=dm, other=0.0)
    page = tl.load(pages_ptr + b * NP + n)
    p = tl.maximum(page, 0)
    packed = packed_ptr + p * sp_p + h * sp_h
    j, w = tl.arange(0, PER), tl.arange(0, W)
    out = out_ptr + bh * NP * T + n * T + w[None, :] * PER + j[:, None]
    for g in tl.static_range(T // GROUP):
        srow = p * ss_p + h * ss_h + g * ss_t + d
        qs = q * tl.load(scale_ptr + srow, mask=dm, other=0.0).to(tl.float32)
        qz = tl.sum(q * tl.load(zero_ptr + srow, mask=dm, other=0.0).to(tl.float32), axis=0)
        words = tl.load(packed + (g * W + w)[:, None] * sp_t + d[None, :], mask=dm[None, :], other=0)
        codes = (words[None, :, :] >> (j * BITS)[:, None, None]) & (2**BITS - 1)
        s = tl.sum(codes.to(tl.float32) * qs[None, None, :], axis=2) + qz
        tl.store(out + g * GROUP, tl.where(page >= 0, s, 0.0))


def sketch_scores(qc: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  pages: torch.Tensor, bits: int) -> torch.Tensor:
    """Same contract as sketch_scores.sketch_scores."""
    b, n = pages.shape
    _, h, w, d = packed.shape
    t = w * codes_per_word(bits)
    packed, scale, zero = _unpacked(QuantizedKeys(packed, scale, zero))
    qc, pages = qc.float().contiguous(), pages.contiguous()
    out = torch.empty(b, h, n * t, dtype=torch.float32, device=qc.device)
    if out.numel():
        _sketch_scores_kernel[(b * h, n)](
            qc, packed, scale, zero, pages, out, h, d, n, packed.stride(0), packed.stride(1), packed.stride(2),
            scale.stride(0), scale.stride(1), scale.stride(2), T=t, BITS=bits, GROUP=GROUP,
            BLOCK_D=triton.next_power_of_2(d))
    return out
