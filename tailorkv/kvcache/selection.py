"""TailorKV's two-stage retrieval as pure functions (the reference the GPU kernels are tested against).

Stage 1 ranks key channels per KV head by |mean over the GQA group of q̂| * max_t |K| (Eq. 10) and keeps d_s.
Stage 2 scores prompt tokens with the real query's group mean on those channels (raw dot product, no softmax)
and keeps the top k per KV head among positions [begin, end) — never sink, recent or generated tokens.
Every function takes optional leading batch dims (one per sequence).
"""

from __future__ import annotations

import functools

import torch

from tailorkv.kernels import block_maxima, block_topk, token_topk


def group_mean(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Hq, D] -> [..., Hkv, D]: the mean over each KV head's group of query heads."""
    return q.float().reshape(*q.shape[:-2], num_kv_heads, -1, q.shape[-1]).mean(-2)


def channel_scores(q_hat: torch.Tensor, max_abs_k: torch.Tensor) -> torch.Tensor:
    """Eq. 10's channel scores: q_hat [..., Hq, D] (predicted query), max_abs_k [..., Hkv, D] -> [..., Hkv, D]."""
    return group_mean(q_hat, max_abs_k.shape[-2]).abs() * max_abs_k.float()


def query_channels(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The query's group mean on the chosen channels: q [..., Hq, D], channels [..., Hkv, d_s] -> [..., Hkv, d_s]."""
    return group_mean(q, channels.shape[-2]).gather(-1, channels)


def score_tokens(q: torch.Tensor, k_channels: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """q [..., Hq, D], k_channels [..., Hkv, d_s, L] (the chosen channels of K), channels [..., Hkv, d_s]
    -> scores [..., Hkv, L]."""
    return torch.einsum("...hc,...hcl->...hl", query_channels(q, channels), k_channels.float())


def outside_masked(scores: torch.Tensor, begin: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """scores [..., Hkv, L] with positions outside [begin, end) (0-d, or [...] per sequence) at -inf."""
    return _masked(scores, torch.arange(scores.shape[-1], device=scores.device), begin, end)


def _masked(
    values: torch.Tensor, pos: torch.Tensor, begin: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """values [..., Hkv, N] at positions pos (broadcast to it) with those outside [begin, end) at -inf."""
    if begin.dim():
        begin, end = begin[..., None, None], end[..., None, None]
    return values.masked_fill((pos < begin) | (pos >= end), float("-inf"))


def block_candidates(
    scores: torch.Tensor, begin: torch.Tensor, end: torch.Tensor, blocks: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of every position of the chosen blocks [..., Hkv, k] (outside [begin, end), end <= L, so past the
    row too: -inf) and those positions [..., Hkv, k * chunk], clamped into the row."""
    pos = (blocks[..., None] * chunk + torch.arange(chunk, device=scores.device)).flatten(-2)
    inside = pos.clamp(max=scores.shape[-1] - 1)
    return _masked(scores.gather(-1, inside), pos, begin, end), inside


def valid_ranks(values: torch.Tensor, k_rows: torch.Tensor | None) -> torch.Tensor:
    """Which top-k slots count: a score above -inf, at a rank below the sequence's own k_rows [...] if given."""
    valid = values > float("-inf")
    if k_rows is not None:
        valid &= torch.arange(valid.shape[-1], device=valid.device) < k_rows[..., None, None]
    return valid


class Selection:
    """Stage 1 and 2 as the decode step runs them: the top-ks in torch.topk and the elementwise work around them,
    which `compiled` (--enable-torch-compile) runs through torch.compile, a kernel per function instead of 3-7."""

    def __init__(self, compiled: bool = False):
        wrap = torch.compile if compiled else (lambda f: f)
        self.channel_scores, self.query_channels = wrap(channel_scores), wrap(query_channels)
        self.outside_masked, self.valid_ranks = wrap(outside_masked), wrap(valid_ranks)
        self.block_maxima = wrap(block_maxima.block_maxima)  # off CUDA
        self.block_candidates = wrap(block_candidates)

    def select_channels(
        self, q_hat: torch.Tensor, max_abs_k: torch.Tensor, d_s: int
    ) -> torch.Tensor:
        """q_hat [..., Hq, D] (predicted query), max_abs_k [..., Hkv, D] -> channel ids [..., Hkv, d_s]."""
        return self.channel_scores(q_hat, max_abs_k).topk(d_s, dim=-1).indices

    def select_tokens(
        self,
        scores: torch.Tensor,
        begin,
        end,
        k: int,
        k_rows: torch.Tensor | None = None,
        chunk: int = 0,
        radix: bool = False,
        in_order: bool = False,
        maxima: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top min(k, L) scores per KV head among positions [begin, end) (ints, or tensors [...] per
        sequence): (positions [..., Hkv, k'], valid [..., Hkv, k']); a slot is invalid when the range holds fewer
        than k', or its rank is k_rows [...] (a sequence's own k <= k) or more: then the valid slots are that
        sequence's top k_rows. On CUDA, in position order: where `radix`, by token_topk's radix select; else, with
        `chunk`, by block_topk's kernel where its tiles hold the shape. Else, with `chunk`, by two_stage_topk over
        chunks of that many positions, or by torch.topk (slots in rank order, or sorted into position order with
        `in_order`; on CPU ~2x faster than token_topk's reference, which tests hold the kernels to). `maxima`: the
        blocks' maxima where the caller has them (block_maxima's of the scores over the range, in blocks of
        `chunk`), which the blocks' paths then do not compute."""
        begin, end = (torch.as_tensor(x, device=scores.device) for x in (begin, end))
        kernel = self._position_kernel(scores, k, chunk, radix, maxima)
        if kernel is not None:  # in position order
            rows = (
                scores.reshape(-1, *scores.shape[-2:])
                if scores.dim() > 1
                else scores.view(1, 1, -1)
            )
            b, e, kr = (
                x if x is None or not x.dim() else x.reshape(-1) for x in (begin, end, k_rows)
            )
            top = kernel(rows, b, e, k, kr)
            return tuple(x.view(*scores.shape[:-1], -1) for x in top)
        values, indices = self.two_stage_topk(
            scores, begin, end, min(k, scores.shape[-1]), chunk, maxima
        )
        valid = self.valid_ranks(values, k_rows)
        if not in_order:
            return indices, valid
        indices, order = indices.sort(dim=-1)
        return indices, valid.gather(-1, order)

    @staticmethod
    def _position_kernel(
        scores: torch.Tensor, k: int, chunk: int, radix: bool, maxima: torch.Tensor | None
    ):
        """A CUDA kernel that selects in position order: token_topk's radix select where `radix`, else
        block_topk's where `chunk` and its tiles hold the shape; None off CUDA or where neither applies."""
        topk = token_topk.ops(scores.device)
        if radix and topk is not token_topk:
            return topk.top_positions
        blocks = block_topk.ops(scores.device) if chunk else block_topk
        n = scores.shape[-1]
        if blocks is not block_topk and blocks.fits(n, min(k, n), chunk):
            return functools.partial(blocks.top_positions, chunk=chunk, maxima=maxima)
        return None

    def two_stage_topk(
        self,
        scores: torch.Tensor,
        begin: torch.Tensor,
        end: torch.Tensor,
        k: int,
        chunk: int,
        maxima: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.topk of the scores [..., Hkv, L] with positions outside [begin, end) at -inf: values (sorted,
        largest first) and indices, by way of `chunk`-position blocks: the k blocks with the largest maxima, then
        the top k of their k * chunk positions (two short top-ks instead of radix passes over long rows; the mask
        and the blocks' maxima one pass over the scores, block_maxima's kernel on CUDA, the blocks' scores one
        gather). The k-th largest score is at least the k-th largest block maximum, so every element of the top k
        lies in one of those blocks. Ties may pick other indices; every index lies inside the row. chunk 0, or
        k * chunk >= L: torch.topk itself."""
        if not chunk or k * chunk >= scores.shape[-1]:
            return self.outside_masked(scores, begin, end).topk(k, dim=-1)
        if maxima is None:
            kernel = block_maxima.ops(scores.device)
            maxima = (self.block_maxima if kernel is block_maxima else kernel.block_maxima)(
                scores, begin, end, chunk
            )
        best = maxima.topk(k, dim=-1).indices
        values, pos = self.block_candidates(scores, begin, end, best, chunk)
        values, pick = values.topk(k, dim=-1)
        return values, pos.gather(-1, pick)


EAGER = Selection()
select_channels, select_tokens = EAGER.select_channels, EAGER.select_tokens


def two_stage_topk(scores: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection.two_stage_topk over the whole row (eager): torch.topk(scores, k, -1) by way of blocks."""
    # made on the device, no host copy: CUDA graphs capture it
    n = torch.full((), scores.shape[-1], device=scores.device)
    return EAGER.two_stage_topk(scores, torch.zeros_like(n), n, k, chunk)
