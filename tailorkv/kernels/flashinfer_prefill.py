"""FlashInfer prefill attention (GPU only, imported lazily): single-sequence attention with its log-sum-exp, which lets
partial results merge, and prefill after a shared prefix: every row's queries over the prefix in one call (a
contiguous prefix, or pages read in place), over their own keys in one ragged causal call (the mask aligned to each
row's last query), the two merged in place. GQA without expanding K/V heads. attention.py holds the torch references with the same signatures and picks this module
on CUDA."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

WORKSPACE = (
    128 << 20
)  # FlashInfer's float workspace, one per device, shared by its ragged wrappers (run in order)
PLANS = 4  # wrappers of each kind kept planned per device: one per group of rows of a step; a step has 1-2 groups

_wrappers: dict[
    tuple, OrderedDict
] = {}  # (device, kind) -> planned wrappers, least recently used first
_workspace: dict[torch.device, torch.Tensor] = {}


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as attention.attention_lse."""
    import flashinfer

    out, lse = flashinfer.single_prefill_with_kv_cache(
        q, k, v, causal=causal, sm_scale=sm_scale, return_lse=True
    )
    return out, lse * math.log(2)  # FlashInfer's log-sum-exp is base 2


def _ragged(
    q: torch.Tensor, k: torch.Tensor, cu: list[int], cu_k: list[int], sm_scale: float | None
):
    """A ragged prefill wrapper planned for these rows (a plan is reused by every layer of a step)."""
    import flashinfer

    key = (q.device, tuple(cu), tuple(cu_k), q.shape[1], k.shape[1], q.shape[2], q.dtype, sm_scale)
    plans = _wrappers.setdefault((q.device, "ragged"), OrderedDict())
    w, planned = _wrapper(
        plans, key, lambda ws: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    )
    if planned:
        return w
    w.plan(
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(cu_k, dtype=torch.int32),
        q.shape[1],
        k.shape[1],
        q.shape[2],
        causal=True,
        sm_scale=sm_scale,
        q_data_type=q.dtype,
        kv_data_type=k.dtype,
    )
    plans[key] = w
    return w


def _wrapper(plans: OrderedDict, key: tuple, make):
    """(the wrapper planned for `key`, True) or (a wrapper to plan for it, False): the least recently used one
    of its kind once PLANS are kept, else a new one from `make(workspace)`."""
    if key in plans:
        plans.move_to_end(key)
        return plans[key], True
    if len(plans) >= PLANS:
        return plans.popitem(last=False)[1], False
    device = key[0]
    if device not in _workspace:
        _workspace[device] = torch.empty(WORKSPACE, dtype=torch.uint8, device=device)
    return make(_workspace[device]), False


def _paged(q: torch.Tensor, k_pages: torch.Tensor, slots: tuple[int, ...], sm_scale: float | None):
    """A paged prefill wrapper planned for all of q's queries over the full pages `slots` (HND pages: every
    layer of a step reuses the plan)."""
    import flashinfer

    _, h, page, d = k_pages.shape
    key = (q.device, q.shape[0], slots, q.shape[1], h, page, d, q.dtype, sm_scale)
    plans = _wrappers.setdefault((q.device, "paged"), OrderedDict())
    w, planned = _wrapper(
        plans, key, lambda ws: flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "HND")
    )
    if planned:
        return w
    i32 = dict(dtype=torch.int32)
    w.plan(
        torch.tensor([0, q.shape[0]], **i32),
        torch.tensor([0, len(slots)], **i32),
        torch.tensor(slots, **i32, device=q.device),
        torch.tensor([page], **i32),
        q.shape[1],
        h,
        d,
        page,
        causal=False,
        sm_scale=sm_scale,
        q_data_type=q.dtype,
        kv_data_type=k_pages.dtype,
    )
    plans[key] = w
    return w


def paged_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: list[int],
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slots: tuple[int, ...],
    sm_scale: float | None = None,
    cu_k: list[int] | None = None,
) -> torch.Tensor:
    """Same contract as attention.paged_prefix_attention."""
    import flashinfer

    own, own_lse = _ragged(q, k, cu, cu_k or cu, sm_scale).run(q, k, v, return_lse=True)
    out, lse = _paged(q, k_pages, slots, sm_scale).run(q, (k_pages, v_pages), return_lse=True)
    flashinfer.merge_state_in_place(out, lse, own, own_lse)
    return out


def shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: list[int],
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    sm_scale: float | None = None,
    cu_k: list[int] | None = None,
) -> torch.Tensor:
    """Same contract as attention.shared_prefix_attention."""
    import flashinfer

    own, own_lse = _ragged(q, k, cu, cu_k or cu, sm_scale).run(q, k, v, return_lse=True)
    if not prefix_k.shape[0]:
        return own
    out, lse = flashinfer.single_prefill_with_kv_cache(
        q, prefix_k, prefix_v, sm_scale=sm_scale, return_lse=True
    )
    flashinfer.merge_state_in_place(out, lse, own, own_lse)
    return out
