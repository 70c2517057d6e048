"""Attention over a sequence's keys in splits, merged (as FlashDecoding does): each split leaves its normalized
output and its log-sum-exp in base 2, -inf (and zeros) where it saw no key. `merged_row` weighs them by an online
softmax over the splits, walked in fixed blocks so that one compiled variant serves any number of them; a row that
no split saw is 0. The Q layers' paged attention (kivi_triton) and the S layers' sparse attention
(sparse_attention_triton) each launch it from a kernel of their own, so that a profile tells the two apart."""

from __future__ import annotations

import triton
import triton.language as tl

MERGE_BLOCK = 16  # splits merged at a time


@triton.jit
def merged_row(
    part_ptr, part_lse_ptr, out_ptr, row, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Row `row` of out [rows, D] from part [rows, S, D] and part_lse [rows, S] (stored in out's dtype)."""
    row = row.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(part_lse_ptr + row * S + s, mask=s < S, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: every weight 0
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        part = tl.load(
            part_ptr + (row * S + s[:, None]) * D + d[None, :],
            mask=(s < S)[:, None] & (d < D)[None, :],
            other=0.0,
        )
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        total = total * alpha + tl.sum(w, axis=0)
        m = m_new
    tl.store(out_ptr + row * D + d, acc / tl.where(total > 0, total, 1.0), mask=d < D)
