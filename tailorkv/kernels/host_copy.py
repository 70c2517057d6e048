"""Moves between the GPU tier and the (pinned) host tier, driven by indices that live on the compute device: the
plain-torch reference. host_copy_triton.py has the same functions and signatures; on CUDA its kernels read and
write pinned host memory directly (UVA zero-copy), so the indices never leave the GPU and no host sync happens.

Every tensor indexed by `pages` has pages as its leading dim. Results land on the device of the index tensors.
- copy_pages: dst[dst_pages] = src[src_pages] (offload a prompt's pages, or bring a request's pages back; dst pages
  < 0 skipped).
- gather_channels: TailorKV stage 1, chosen channels of channel-major K [P, H, D, T] for every token of a row's
  pages -> [B, H, C, NP * T].
- gather_rows: the top-k fetch, token-major token rows [P, T, H, W] (a token's K and V of one head side by side)
  at positions idx [B, H, K] -> [B, H, K, W]; a page with a GPU copy (copy_slots [B, NP] >= 0, the slot in copies
  [S, T, H, W]) is read there instead of over PCIe; so is a row the last step fetched too (`reuse`: the rows kept
  [S, H, N, W] per slot and head, their positions [S, H, N] (-1: none), and each row's slot [B]).
Page tables [B, NP] are padded with -1 past a row's pages: nothing is read there and zeros are returned.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from .dispatch import pick


def copy_pages(
    src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor
) -> None:
    """dst[dst_pages] = src[src_pages]; src and dst have the same page shape and dtype, either on either tier. A
    destination page < 0 is skipped (nothing read or written for it)."""
    keep = dst_pages >= 0
    src_pages, dst_pages = src_pages[keep.to(src_pages.device)], dst_pages[keep]
    dst[dst_pages.to(dst.device)] = src[src_pages.to(src.device)].to(dst.device)


def gather_channels(
    k_t: torch.Tensor, pages: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """k_t [P, H, D, T], pages [B, NP], channels [B, H, C] -> [B, H, C, NP * T] on pages' device (written into
    `out` when given)."""
    src = pages.to(k_t.device)
    heads = torch.arange(k_t.shape[1], device=k_t.device)[None, None, :, None]
    kc = k_t[
        src.clamp(min=0)[:, :, None, None], heads, channels.to(k_t.device)[:, None]
    ]  # [B, NP, H, C, T]
    kc = kc.masked_fill((src < 0)[:, :, None, None, None], 0)
    b, np_, h, c, t = kc.shape
    res = kc.permute(0, 2, 3, 1, 4).reshape(b, h, c, np_ * t)
    return res.to(pages.device) if out is None else out.copy_(res)


def gather_rows(
    rows: torch.Tensor,
    pages: torch.Tensor,
    idx: torch.Tensor,
    copies: torch.Tensor | None = None,
    copy_slots: torch.Tensor | None = None,
    reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """rows [P, T, H, W] (token-major pages), pages [B, NP], positions idx [B, H, K] -> [B, H, K, W] on pages'
    device; where copy_slots [B, NP] (beside `copies` [S, T, H, W] on pages' device) is >= 0, from that copy; where
    reuse = (kept [S, H, N, W], kept_pos [S, H, N], slots [B]) has idx[b, h, i] == kept_pos[slots[b], h, j], from
    kept[slots[b], h, j] (before both; a position is kept at most once).
    Each output row is copied once from where it lives (index_select of whole rows into zeros: advanced
    indexing and a broadcast masked_fill took ~4x as long on CPU, for the same bytes)."""
    rows = rows.contiguous()  # a view of whole rows (the tiers' tensors are contiguous: no copy)
    copies = None if copies is None else copies.contiguous()
    (t, h, w), (b, _, k) = rows.shape[1:], idx.shape
    at = idx.to(rows.device)
    page_of = (at // t).view(b, -1)
    page = pages.to(rows.device).gather(1, page_of).view(-1)
    heads = torch.arange(h, device=rows.device)[None, :, None]
    row = ((at % t) * h + heads).view(-1)  # the row within its page
    take = page >= 0
    if reuse is not None:
        last, kept_pos, slots = reuse
        eq = idx[..., :, None] == kept_pos[slots][:, :, None, :]  # [B, H, K, N]
        j = torch.where(eq.any(-1), eq.to(torch.uint8).argmax(-1), -1)
        kept = (j >= 0).view(-1).to(rows.device)
        take &= ~kept
    if copies is not None:
        slot = copy_slots.gather(1, page_of.to(copy_slots.device)).view(-1)
        from_copy = slot >= 0
        if reuse is not None:
            from_copy &= ~kept.to(slot.device)
        take &= ~from_copy.to(rows.device)
    out = torch.zeros(b * h * k, w, dtype=rows.dtype, device=pages.device)
    sel = take.nonzero().view(-1)
    src = rows.view(-1, w).index_select(0, page[sel] * (t * h) + row[sel])
    out.index_copy_(0, sel.to(out.device), src.to(out.device))
    if copies is not None:
        sel = from_copy.nonzero().view(-1)
        src = copies.view(-1, w).index_select(0, slot[sel] * (t * h) + row.to(copies.device)[sel])
        out.index_copy_(0, sel.to(out.device), src)
    if reuse is not None:
        n = last.shape[2]
        flat = ((slots[:, None, None] * h + heads.to(slots.device)) * n + j).view(-1)
        sel = (j >= 0).view(-1).nonzero().view(-1)
        out.index_copy_(0, sel, last.reshape(-1, w).index_select(0, flat[sel]))
    return out.view(b, h, k, w)


def ops(device: torch.device | str) -> ModuleType:
    """host_copy_triton on CUDA when triton imports, else this reference (same functions, same signatures)."""
    return pick(device, "host_copy_triton", sys.modules[__name__])
