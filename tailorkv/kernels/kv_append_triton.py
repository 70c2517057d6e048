"""Triton version of kv_append.py (same function, signature and result): one program per row copies its K and V."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kv_kernel(gk_ptr, gv_ptr, at_ptr, k_ptr, v_ptr, E, sg, sk_b, sv_b, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.load(at_ptr + b).to(tl.int64)
    e = tl.arange(0, BLOCK)
    ok = e < E
    tl.store(gk_ptr + slot * sg + e, tl.load(k_ptr + b * sk_b + e, mask=ok), mask=ok)
    tl.store(gv_ptr + slot * sg + e, tl.load(v_ptr + b * sv_b + e, mask=ok), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, D] with each row's H x D contiguous (what the kernel reads at one stride a row)."""
    return x if x[0].is_contiguous() else x.contiguous()


def append_kv(
    gen_k: torch.Tensor, gen_v: torch.Tensor, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Same contract as kv_append.append_kv."""
    if not (gen_k.is_contiguous() and gen_v.is_contiguous() and gen_k.stride() == gen_v.stride()):
        raise ValueError("append_kv: gen_k and gen_v must be contiguous and alike")
    b = at.numel()
    if not b:
        return
    k, v = _rows(k.to(gen_k.dtype)), _rows(v.to(gen_v.dtype))
    e = gen_k[0].numel()
    _append_kv_kernel[(b,)](
        gen_k,
        gen_v,
        at.contiguous(),
        k,
        v,
        e,
        gen_k.stride(0),
        k.stride(0),
        v.stride(0),
        BLOCK=triton.next_power_of_2(e),
    )
