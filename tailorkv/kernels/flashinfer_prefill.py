"""FlashInfer prefill attention (GPU only, imported lazily): single-sequence attention with its log-sum-exp, which lets
partial results merge, and prefill after a shared prefix: every row's queries over the prefix in one call, over
their own keys in one ragged causal call (the mask aligned to each row's last query), the two merged in place. GQA
without expanding K/V heads. attention.py holds the torch references with the same signatures and picks this module
on CUDA."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .flashinfer_decode import PinnedPlan

# FlashInfer's float workspace, one per device, shared by its ragged wrappers (run in order); FA2's split keys take
# up to 2 CTAs an SM x GQA x 128 queries x head_dim floats: 138 MB at GQA 8, head_dim 128 on 132 SMs
WORKSPACE = 256 << 20
PLANS = 4  # ragged wrappers kept planned per device: one per group of rows of a step; a step has 1-2 groups

_wrappers: dict[tuple[torch.device, bool], OrderedDict] = {}  # by (device, causal)
_workspace: dict[torch.device, torch.Tensor] = {}


def _workspace_of(device: torch.device) -> torch.Tensor:
    if device not in _workspace:
        _workspace[device] = torch.empty(WORKSPACE, dtype=torch.uint8, device=device)
    return _workspace[device]


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
    q: torch.Tensor,
    k: torch.Tensor,
    cu: list[int],
    cu_k: list[int],
    sm_scale: float | None,
    causal: bool = True,
):
    """A ragged prefill wrapper planned for these rows (a plan is reused by every layer of a step). Causal: the
    backend FlashInfer picks (FA3 on Hopper); else FA2, whose plan splits long keys across the SMs where FA3's gives
    each tile of queries one CTA over all of them."""
    import flashinfer

    key = (tuple(cu), tuple(cu_k), q.shape[1], k.shape[1], q.shape[2], q.dtype, sm_scale)
    plans = _wrappers.setdefault((q.device, causal), OrderedDict())
    if key in plans:
        plans.move_to_end(key)
        return plans[key][0]
    w, pinned = (
        plans.popitem(last=False)[1]
        if len(plans) >= PLANS
        else (
            flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
                _workspace_of(q.device), "NHD", backend="auto" if causal else "fa2"
            ),
            PinnedPlan(),
        )
    )
    pinned(
        w.plan,
        torch.tensor(cu, dtype=torch.int32),
        torch.tensor(cu_k, dtype=torch.int32),
        q.shape[1],
        k.shape[1],
        q.shape[2],
        causal=causal,
        sm_scale=sm_scale,
        q_data_type=q.dtype,
        kv_data_type=k.dtype,
    )
    plans[key] = (w, pinned)
    return w


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
    # every query over the prefix as one ragged row, on FA2 with its keys split across the SMs: single prefill gave
    # a doc chat turn's 80 queries over a 64k document 24 CTAs, 672 us a layer on the H100 (2026-12-06)
    out, lse = _ragged(q, prefix_k, [0, q.shape[0]], [0, prefix_k.shape[0]], sm_scale, False).run(
        q, prefix_k, prefix_v, return_lse=True
    )
    flashinfer.merge_state_in_place(out, lse, own, own_lse)
    return out


class PagedPrefill:
    """Prompt rows attending in place to paged full-precision K/V [P, page_size, Hkv, D] (NHD): each row's queries
    are the last of its tokens, causally (the mask aligned to the end, as causal_attention's q_start). `plan` once
    per step, `run` once per layer; attention.causal_attention over the gathered slots is the reference."""

    def __init__(self, device: torch.device, num_qo_heads: int, num_kv_heads: int, head_dim: int):
        import flashinfer

        self.shape, self.device = (num_qo_heads, num_kv_heads, head_dim), device
        # "auto" (FA3 on Hopper) for long chunks; FA2 for few queries over long keys (a chat turn after a document):
        # FA3's plan gives each (query head, tile of 128 queries) one CTA over all the keys, so 80 queries were 32
        # CTAs; FA2 packs a KV head's query heads into a tile and splits the keys across the SMs
        self.wrappers = {
            b: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                _workspace_of(device), "NHD", backend=b
            )
            for b in ("auto", "fa2")
        }
        # a plan writes its wrapper's page-locked buffer for a copy the stream runs later: the next plan of the
        # same wrapper waits for that copy (a 64k prompt's third 8k chunk, planned while the second's copy was
        # still queued, read the wrong pages: cudaErrorInvalidAddressSpace on an H100 once a synchronous copy that
        # had kept the host behind the stream was gone; NOTES)
        self.pinned = {b: PinnedPlan() for b in self.wrappers}
        self.ctas = 2 * torch.cuda.get_device_properties(device).multi_processor_count

    def plan(
        self,
        pages: list[torch.Tensor],
        lengths: list[int],
        new: list[int],
        page_size: int,
        dtype: torch.dtype,
    ) -> None:
        """Row i: `new[i]` queries, the last of its lengths[i] tokens, in its pages[i] (page ids on the device)."""
        hq, hkv, d = self.shape
        fa3_items = hq * sum(-(-n // 128) for n in new)
        backend = "fa2" if fa3_items < self.ctas else "auto"
        self.wrapper = self.wrappers[backend]
        counts = [-(-n // page_size) for n in lengths]
        i32 = dict(dtype=torch.int32)
        self.pinned[backend](
            self.wrapper.plan,
            torch.tensor([0, *new], **i32).cumsum(0, **i32),
            torch.tensor([0, *counts], **i32).cumsum(0, **i32),
            torch.cat([p[:c] for p, c in zip(pages, counts)]).to(self.device, **i32),
            torch.tensor([n - (c - 1) * page_size for n, c in zip(lengths, counts)], **i32),
            hq,
            hkv,
            d,
            page_size,
            causal=True,
            q_data_type=dtype,
            kv_data_type=dtype,
        )

    def warm_up_sizes(self) -> list[int]:
        """Chunk lengths (one row) that take each backend, for compiling both before serving."""
        return [1, 128 * -(-self.ctas // self.shape[0])]

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        return self.wrapper.run(q, (k_pages, v_pages))
