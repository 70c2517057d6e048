"""Triton version of channel_select.py (same function, signature and result): one program per (row, KV head)
sums the group's query heads, scores the channels against the row's max_abs and takes the d_s largest by d_s
rounds of max then lowest index among equals, all in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _channel_select_kernel(
    q_ptr,
    ma_ptr,
    slots_ptr,
    ch_ptr,
    qc_ptr,
    H,
    G,
    D,
    sq_b,
    sq_h,
    sm_s,
    sm_h,
    DS: tl.constexpr,
    GP: tl.constexpr,
    DP: tl.constexpr,
    SP: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    g = tl.arange(0, GP)
    c = tl.arange(0, DP)
    qs = tl.load(
        q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + c[None, :],
        mask=(g < G)[:, None] & (c < D)[None, :],
        other=0.0,
    )
    mean = tl.sum(qs.to(tl.float32), 0) / G
    slot = tl.load(slots_ptr + b)
    ma = tl.load(ma_ptr + slot * sm_s + h * sm_h + c, mask=c < D, other=0.0)
    score = tl.where(c < D, tl.abs(mean) * ma, -1.0)  # scores are >= 0: -1 is taken or padding
    j = tl.arange(0, SP)
    chosen = tl.zeros((SP,), tl.int64)
    value = tl.zeros((SP,), tl.float32)
    for i in tl.static_range(DS):
        best = tl.max(score, 0)
        at = tl.min(tl.where(score == best, c, DP), 0)
        chosen = tl.where(j == i, at, chosen)
        value = tl.where(j == i, tl.sum(tl.where(c == at, mean, 0.0), 0), value)
        score = tl.where(c == at, -1.0, score)
    tl.store(ch_ptr + bh * DS + j, chosen, mask=j < DS)
    tl.store(qc_ptr + bh * DS + j, value, mask=j < DS)


def select_channels(
    q: torch.Tensor, max_abs: torch.Tensor, slots: torch.Tensor, d_s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as channel_select.select_channels."""
    b, hq, d = q.shape
    h = max_abs.shape[-2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    max_abs = max_abs.float()
    if max_abs.stride(-1) != 1:
        max_abs = max_abs.contiguous()
    slots = slots.to(q.device, torch.int64).contiguous()
    channels = torch.empty(b, h, d_s, dtype=torch.int64, device=q.device)
    qc = torch.empty(b, h, d_s, dtype=torch.float32, device=q.device)
    if b:
        _channel_select_kernel[(b * h,)](
            q,
            max_abs,
            slots,
            channels,
            qc,
            h,
            hq // h,
            d,
            q.stride(0),
            q.stride(1),
            max_abs.stride(0),
            max_abs.stride(1),
            DS=d_s,
            GP=triton.next_power_of_2(hq // h),
            DP=triton.next_power_of_2(d),
            SP=triton.next_power_of_2(d_s),
            num_warps=1,
        )
    return channels, qc
