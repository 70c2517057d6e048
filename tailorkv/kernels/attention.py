"""Exact attention: causal prefill (SDPA), attention with its log-sum-exp, the merge of partial results, prefill after
a shared prefix built from them (these two FlashInfer on CUDA when it imports, flashinfer_prefill.py, else the torch
references here, same signatures), and the decode reference `grouped_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import flashinfer_decode

SCORE_CHUNK = 1 << 27  # attention_lse's reference: float32 scores held at once (512 MiB)


def _flashinfer(x: torch.Tensor):
    if not flashinfer_decode.available(x.device, x.dtype, x.shape[-1]):
        return None
    from . import flashinfer_prefill

    return flashinfer_prefill


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, sm_scale: float | None = None
) -> torch.Tensor:
    """q [n, Hq, D] at positions q_start..q_start+n-1 over k, v [L, Hkv, D] at positions 0..L-1 with
    L = q_start + n (GQA by head groups); query i sees keys 0..q_start+i. Returns [n, Hq, D] in q's dtype."""
    n, L = q.shape[0], k.shape[0]
    if q_start + n != L:
        raise ValueError(
            f"causal_attention: {n} queries from position {q_start} need {q_start + n} keys, got {L}"
        )
    # a chunk after earlier tokens: the causal mask aligned to the bottom right. On CUDA SDPA's fused kernels apply
    # it without an [n, L] mask in memory (an explicit mask took 6 GiB at 8k x 128k); its module imports Dynamo (2 s
    # a process), so only there. On CPU SDPA materializes that mask anyway: the same [n, L] mask, the same bits
    mask = None
    if q_start and q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, L)
    elif q_start:
        mask = torch.ones(n, L, dtype=torch.bool).tril(q_start)
    if q.is_cuda and q.shape[1] != k.shape[1]:
        # SDPA's fused CUDA kernels refuse enable_gqa; expanded heads keep it off the O(n^2)-memory math path
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    # 4-D [1, heads, tokens, D]: the fused (flash / memory-efficient) kernels take no 3-D input
    out = F.scaled_dot_product_attention(
        *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)),
        attn_mask=mask,
        is_causal=mask is None,
        scale=sm_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D] over k, v [L, Hkv, D] (GQA by head groups; causal: the queries are the last n positions, query i
    sees keys 0..L-n+i) -> (out [n, Hq, D] in q's dtype, lse [n, Hq] float32: the natural log-sum-exp of the
    scaled scores, -inf over no keys). The reference computes in float32, a chunk of queries at a time."""
    fast = _flashinfer(q)
    if fast is not None and k.shape[0]:
        return fast.attention_lse(q, k, v, causal, sm_scale)
    (n, hq, d), (L, hkv) = q.shape, k.shape[:2]
    kf, vf = k.float(), v.float()
    out = torch.zeros(n, hkv, hq // hkv, d, device=q.device)
    lse = torch.full((n, hkv, hq // hkv), float("-inf"), device=q.device)
    step = max(1, SCORE_CHUNK // max(hq * L, 1))
    for a in range(0, n if L else 0, step):
        qc = q[a : a + step].float().reshape(-1, hkv, hq // hkv, d)
        scores = torch.einsum("nhgd,lhd->nhgl", qc, kf) * (sm_scale or d**-0.5)
        if causal:
            seen = (
                torch.arange(L, device=q.device)
                <= torch.arange(a, a + len(qc), device=q.device)[:, None] + L - n
            )
            scores = scores.masked_fill(~seen[:, None, None], float("-inf"))
        lse[a : a + step] = scores.logsumexp(-1)
        out[a : a + step] = torch.einsum("nhgl,lhd->nhgd", scores.softmax(-1), vf)
    return out.view(n, hq, d).to(q.dtype), lse.view(n, hq)


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
    """Prefill rows that follow one shared prefix of P tokens (prefix_k, prefix_v [P, Hkv, D], P may be 0): row i's
    queries q[cu[i]:cu[i+1]] [.., Hq, D] see the whole prefix and, causally, the row's own keys
    k, v[cu_k[i]:cu_k[i+1]] (cu_k: cu by default), of which the queries are the last. Per row,
    causal_attention(q_i, [prefix | k_i], [prefix | v_i], P + len(k_i) - len(q_i)); but every row's queries attend
    to the prefix in one call, and no row copies it."""
    fast = _flashinfer(q)
    if fast is not None:
        return fast.shared_prefix_attention(q, k, v, cu, prefix_k, prefix_v, sm_scale, cu_k)
    pre, pre_lse = attention_lse(q, prefix_k, prefix_v, sm_scale=sm_scale)
    own, own_lse = torch.empty_like(q), torch.empty_like(pre_lse)
    for a, b, c, d in zip(cu[:-1], cu[1:], (cu_k or cu)[:-1], (cu_k or cu)[1:]):
        own[a:b], own_lse[a:b] = attention_lse(
            q[a:b], k[c:d], v[c:d], causal=True, sm_scale=sm_scale
        )
    return merge_attention_states(pre.float(), pre_lse, own.float(), own_lse)[0].to(q.dtype)


class PagedPrefill:
    """Prompt rows attending to their pages [P, page_size, Hkv, D] (NHD), each row's queries the last of its tokens,
    causally (the mask aligned to the end): the torch reference of flashinfer_prefill.PagedPrefill, the same `plan`
    (once per step) and `run` (once per layer)."""

    def __init__(self, device: torch.device, num_qo_heads: int, num_kv_heads: int, head_dim: int):
        self.device = device

    def plan(
        self,
        pages: list[torch.Tensor],
        lengths: list[int],
        new: list[int],
        page_size: int,
        dtype: torch.dtype,
    ) -> None:
        """Row i: `new[i]` queries, the last of its lengths[i] tokens, in its pages[i] (page ids)."""
        offsets = torch.arange(page_size, device=self.device)
        self.rows = [
            ((p[: -(-n // page_size), None] * page_size + offsets).flatten()[:n], n, m)
            for p, n, m in zip(pages, lengths, new)
        ]

    def warm_up_sizes(self) -> list[int]:
        """Chunk lengths to run before serving (one kernel path here)."""
        return [1]

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        k_rows, v_rows, out, a = (
            k_pages.flatten(0, 1),
            v_pages.flatten(0, 1),
            torch.empty_like(q),
            0,
        )
        for slots, n, m in self.rows:
            out[a : a + m] = causal_attention(q[a : a + m], k_rows[slots], v_rows[slots], n - m)
            a += m
        return out


class SharedPrefixDecode:
    """Decode rows over pages [P, page_size, Hkv, D] (NHD) where groups of rows begin with the same full pages (one
    document, many users): each group's queries attend to its shared pages in one pass, each row to its own pages
    after them, the two merged by their log-sum-exps (cascade attention, as FlashInfer and vLLM have it; exact up to
    the order of float sums). The torch reference of flashinfer_decode.SharedPrefixDecode: the same `plan` (once per
    step) and `run` (once per layer)."""

    def __init__(
        self,
        device: torch.device,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
    ):
        self.device, self.page_size = device, page_size

    def plan(
        self,
        groups: list[tuple[list[int], torch.Tensor]],
        pages: list[torch.Tensor],
        lengths: list[int],
    ) -> None:
        """groups: (decode rows, the full pages they all begin with); row i then reads the first lengths[i] >= 1
        tokens of its own pages[i] (page ids on the device)."""
        ps = self.page_size
        offsets = torch.arange(ps, device=self.device)

        def slots(p: torch.Tensor, n: int) -> torch.Tensor:
            return (p[: -(-n // ps), None] * ps + offsets).flatten()[:n]

        self.groups = [
            (torch.tensor(rows, device=self.device), slots(p, p.numel() * ps)) for rows, p in groups
        ]
        self.rows = [slots(p, n) for p, n in zip(pages, lengths)]

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        k, v = k_pages.flatten(0, 1), v_pages.flatten(0, 1)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        for i, s in enumerate(self.rows):
            o, m = attention_lse(q[i : i + 1], k[s], v[s])
            out[i], lse[i] = o[0].float(), m[0]
        for rows, s in self.groups:
            o, m = attention_lse(q[rows], k[s], v[s])
            out[rows], lse[rows] = merge_attention_states(out[rows], lse[rows], o.float(), m)
        return out.to(q.dtype)


def merge_partial_states(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention results over disjoint token sets: out [..., S, D] (finite), lse [..., S] ->
    (out [..., D], lse [...]). Empty parts (lse = -inf) weigh nothing; all empty gives out 0, lse -inf."""
    total = torch.logsumexp(lse, -1)
    weight = torch.exp(lse - torch.where(total.isfinite(), total, 0.0)[..., None])
    return (weight[..., None] * out).sum(-2), total


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint token sets from the attention over each: out [..., D], lse [...]."""
    return merge_partial_states(torch.stack([out_a, out_b], -2), torch.stack([lse_a, lse_b], -1))


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence, each KV head with its own key set: q [..., Hq, D], k, v [..., Hkv, L, D]
    -> [..., Hq, D] (float32 math; leading dims are sequences). Query head h reads KV head h // (Hq // Hkv);
    keys where `mask` [..., Hkv, L] is False are ignored."""
    hkv, d = k.shape[-3], k.shape[-1]
    qg = q.float().reshape(*q.shape[:-2], hkv, -1, d)
    scores = torch.einsum("...hgd,...hld->...hgl", qg, k.float()) * (sm_scale or d**-0.5)
    v = v.float()
    if (
        mask is not None
    ):  # masked slots may hold stale memory, NaN included: 0 * NaN would leak into the output
        scores = scores.masked_fill(~mask.unsqueeze(-2), float("-inf"))
        v = v.masked_fill(~mask.unsqueeze(-1), 0.0)
    out = torch.einsum("...hgl,...hld->...hgd", scores.softmax(-1), v)
    return out.reshape(q.shape).to(q.dtype)
