"""Triton version of sketch_scores.py (same function, signature and result): one program per (row, KV head,
sketch page) dequantizes the page's key block tile by tile in registers and dots it with the row's query."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailorkv.kernels.kivi import QuantizedKeys, codes_per_word
from tailorkv.kernels.kivi_triton import _key_tile, _unpacked
from tailorkv.kernels.sketch_scores import GROUP


@triton.jit
def _sketch_scores_kernel(q_ptr, packed_ptr, scale_ptr, zero_ptr, pages_ptr, out_ptr, H, D, NP,
                          sp_p, sp_h, sp_t, ss_p, ss_h, ss_t,
                          T: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + bh * D + d, mask=d < D, other=0.0)
    page = tl.load(pages_ptr + b * NP + n)
    p = tl.maximum(page, 0)
    out = out_ptr + bh * NP * T + n * T
    for t0 in tl.static_range(0, T, GROUP):
        k = _key_tile(packed_ptr + p * sp_p + h * sp_h, scale_ptr + p * ss_p + h * ss_h,
                      zero_ptr + p * ss_p + h * ss_h, sp_t, ss_t, t0, T, D, BITS, GROUP, GROUP, BLOCK_D)
        s = tl.sum(k * q[None, :], axis=1)
        tl.store(out + t0 + tl.arange(0, GROUP), tl.where(page >= 0, s, 0.0))


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
