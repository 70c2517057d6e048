"""Triton versions of host_copy.py (same functions, signatures and results). On CUDA a pinned host tensor is handed
to the kernel as a bare pointer: pinned memory is device-addressable under UVA, so the kernels read (or write) the
host tier straight over PCIe while their indices stay on the GPU. Without CUDA they run in the Triton interpreter
on CPU tensors (the tests do that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COPY_BLOCK = 4096  # elements per copy_pages program
_PAGES_PER_PROGRAM = 8  # gather_channels: pages (runs of T tokens) per load
_GATHER_PROGRAMS = 128  # gather_channels: programs to aim for (about one per SM)
_ROWS_PER_PROGRAM = 32  # gather_rows: token rows per program
# gather_rows with rows kept: kept positions compared a chunk at a time, not as one [32, N] tile
_KEPT_CHUNK = 32


class _HostPointer:
    """A pinned host tensor as a Triton pointer argument: Triton resolves data_ptr() to its UVA device address."""

    def __init__(self, t: torch.Tensor):
        self.t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


def _arg(t: torch.Tensor, device: torch.device):
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            raise ValueError(
                "a host-tier tensor read or written from the GPU must be in pinned memory"
            )
        return _HostPointer(t)
    return t


def _page_stride(x: torch.Tensor) -> int:
    """The stride between pages of x [P, ...]; each page must be one contiguous block."""
    if x.shape[0] and not x[0].is_contiguous():
        raise ValueError("each page must be contiguous")
    return x.stride(0)


@triton.jit
def _copy_pages_kernel(
    src_ptr, src_pages_ptr, dst_ptr, dst_pages_ptr, E, s_src, s_dst, BLOCK: tl.constexpr
):
    i = tl.program_id(0)
    off = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sp = tl.load(src_pages_ptr + i).to(tl.int64)
    dp = tl.load(dst_pages_ptr + i).to(tl.int64)
    ok = off < tl.where(dp >= 0, E, 0)  # no destination: nothing read or written
    tl.store(dst_ptr + dp * s_dst + off, tl.load(src_ptr + sp * s_src + off, mask=ok), mask=ok)


@triton.jit(do_not_specialize=["NP", "sp_b", "pages_per_split"])
def _gather_channels_kernel(
    k_ptr,
    pages_ptr,
    ch_ptr,
    out_ptr,
    NP,
    H,
    C,
    D,
    sk_p,
    sp_b,
    pages_per_split,
    T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # one program per (row, head, chosen channel) and split of the page list, walking BLOCK_P runs of T contiguous
    # tokens at a time: few programs, each with many bytes in flight, so the PCIe-bound read leaves most SMs to
    # the compute it overlaps with
    bhc = tl.program_id(0)
    b, h = bhc // (H * C), (bhc // C) % H
    c = tl.load(ch_ptr + bhc).to(tl.int64)
    t = tl.arange(0, T)
    first = tl.program_id(1) * pages_per_split
    for p0 in range(first, tl.minimum(first + pages_per_split, NP), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < NP) & (p < first + pages_per_split)
        page = tl.load(pages_ptr + b * sp_b + p, mask=ok, other=-1).to(tl.int64)
        x = tl.load(
            k_ptr + page[:, None] * sk_p + (h * D + c) * T + t[None, :],
            mask=(page >= 0)[:, None],
            other=0.0,
        )
        tl.store(
            out_ptr + (bhc.to(tl.int64) * NP + p[:, None]) * T + t[None, :], x, mask=ok[:, None]
        )


@triton.jit(do_not_specialize=["K", "sp_b", "sc_b", "N"])
def _gather_rows_kernel(
    rows_ptr,
    pages_ptr,
    idx_ptr,
    out_ptr,
    copies_ptr,
    cslots_ptr,
    kept_ptr,
    kpos_ptr,
    kslots_ptr,
    H,
    K,
    sr_p,
    sp_b,
    sc_p,
    sc_b,
    N,
    W: tl.constexpr,
    OW: tl.constexpr,
    T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    COPIES: tl.constexpr,
    REUSE: tl.constexpr,
    CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # one program per (row, head) and block of BLOCK_K selected positions; a row whose page has a GPU copy is
    # loaded from it, and one the last step fetched too from the rows kept (the host load is masked off: it never
    # crosses PCIe)
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    pos = tl.load(idx_ptr + bh * K + k, mask=k < K, other=0).to(tl.int64)
    page = tl.load(pages_ptr + b * sp_b + pos // T, mask=k < K, other=-1).to(tl.int64)
    w = tl.arange(0, BLOCK_W)
    ok = (k < K)[:, None] & (w < W)[None, :]
    if REUSE:
        # one load a row from the address its source gives, not a masked load a source: compiled for sm_90 with
        # fp8 rows and N = 128, 62 registers and 45 loads a thread where that took 138 and 154 (NOTES)
        row = ((pos % T) * H + h) * W
        src = rows_ptr + page * sr_p + row
        found = page >= 0
        if COPIES:
            slot = tl.load(cslots_ptr + b * sc_b + pos // T, mask=k < K, other=-1).to(tl.int64)
            src = tl.where(slot >= 0, copies_ptr + slot * sc_p + row, src)
            found = found | (slot >= 0)
        first = (tl.load(kslots_ptr + b).to(tl.int64) * H + h) * N  # the row's kept positions
        at = pos.to(tl.int32)
        j = tl.full([BLOCK_K], -1, tl.int32)  # a position's index among them, or -1
        for n0 in range(0, N, CHUNK):
            n = n0 + tl.arange(0, CHUNK)
            kp = tl.load(kpos_ptr + first + n, mask=n < N, other=-1).to(tl.int32)
            j = tl.maximum(j, tl.max(tl.where(at[:, None] == kp[None, :], n[None, :], -1), axis=1))
        j = tl.where(k < K, j, -1).to(tl.int64)
        src = tl.where(j >= 0, kept_ptr + (first + j) * W, src)
        # rows at multiples of 16 bytes in each source: 16-byte loads (the select hides that)
        if ALIGNED:
            src = tl.multiple_of(src, 16)
        x = tl.load(src[:, None] + w[None, :], mask=ok & (found | (j >= 0))[:, None], other=0.0)
    else:
        # a tile a source, the others masked off: the form above spilled here without 16-byte alignment (NOTES)
        in_page = ((pos % T) * H + h)[:, None] * W + w[None, :]
        on_host = page >= 0
        if COPIES:
            slot = tl.load(cslots_ptr + b * sc_b + pos // T, mask=k < K, other=-1).to(tl.int64)
            on_host = on_host & (slot < 0)
            y = tl.load(
                copies_ptr + slot[:, None] * sc_p + in_page,
                mask=ok & (slot >= 0)[:, None],
                other=0.0,
            )
        x = tl.load(
            rows_ptr + page[:, None] * sr_p + in_page, mask=ok & on_host[:, None], other=0.0
        )
        if COPIES:
            x = tl.where((slot >= 0)[:, None], y, x)
    tl.store(out_ptr + (bh.to(tl.int64) * K + k[:, None]) * OW + w[None, :], x, mask=ok)


def copy_pages(
    src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor
) -> None:
    """Same contract as host_copy.copy_pages."""
    n, e = src_pages.numel(), src[0].numel() if src.shape[0] else 0
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:] or dst_pages.numel() != n:
        raise ValueError(
            "copy_pages: src and dst pages differ in shape or dtype, or the page lists in length"
        )
    if n == 0 or e == 0:
        return
    dev = src_pages.device
    _copy_pages_kernel[(n, triton.cdiv(e, _COPY_BLOCK))](
        _arg(src, dev),
        src_pages.contiguous(),
        _arg(dst, dev),
        dst_pages.to(dev).contiguous(),
        e,
        _page_stride(src),
        _page_stride(dst),
        BLOCK=_COPY_BLOCK,
    )


def gather_channels(
    k_t: torch.Tensor, pages: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as host_copy.gather_channels (T must be a power of two; `out` contiguous)."""
    _, h, d, t = k_t.shape
    pages = pages.contiguous()
    b, np_ = pages.shape
    c = channels.shape[-1]
    if out is None:
        out = torch.empty(b, h, c, np_ * t, dtype=k_t.dtype, device=pages.device)
    if out.numel():
        splits = min(triton.cdiv(np_, _PAGES_PER_PROGRAM), max(1, _GATHER_PROGRAMS // (b * h * c)))
        per_split = triton.cdiv(np_, splits)
        _gather_channels_kernel[(b * h * c, splits)](
            _arg(k_t, pages.device),
            pages,
            channels.contiguous(),
            out,
            np_,
            h,
            c,
            d,
            _page_stride(k_t),
            pages.stride(0),
            per_split,
            T=t,
            BLOCK_P=_PAGES_PER_PROGRAM,
        )
    return out


def gather_rows(
    rows: torch.Tensor,
    pages: torch.Tensor,
    idx: torch.Tensor,
    copies: torch.Tensor | None = None,
    copy_slots: torch.Tensor | None = None,
    reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Same contract as host_copy.gather_rows (T must be a power of two). fp8 rows (uint8, a multiple of 4 bytes)
    are loaded as 32-bit words: bytes would take 256 single-byte loads a thread, 32 bytes a warp instruction over
    PCIe. Rows of 2D + 4 bytes take 4-byte loads; rows padded to 2D + 16 (fp8_row_align 16) 16-byte ones, the row
    width being a compile-time constant. They come back as a view whose rows start 16 bytes apart (272 bytes at
    D = 128), which the sparse attention kernel then loads in 16-byte vectors."""
    if rows.dtype == torch.uint8 and rows.shape[-1] % 4 == 0:
        w = rows.shape[-1]
        words = None if copies is None else copies.view(torch.int32)
        if reuse is not None:
            reuse = (reuse[0].view(torch.int32), *reuse[1:])
        out = _gather(rows.view(torch.int32), pages, idx, words, copy_slots, -(-w // 16) * 4, reuse)
        return out.view(torch.uint8)[..., :w]
    return _gather(rows, pages, idx, copies, copy_slots, rows.shape[-1], reuse)


def _gather(
    rows: torch.Tensor,
    pages: torch.Tensor,
    idx: torch.Tensor,
    copies: torch.Tensor | None,
    copy_slots: torch.Tensor | None,
    out_width: int,
    reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """gather_rows into rows of `out_width` elements (the first W of each written)."""
    _, t, h, w = rows.shape
    pages = pages.contiguous()
    b, _, k = idx.shape
    out = torch.empty(b, h, k, out_width, dtype=rows.dtype, device=pages.device)
    if copies is not None and (copies.dtype != rows.dtype or copies.shape[1:] != rows.shape[1:]):
        raise ValueError("gather_rows: copies must have the rows' page shape and dtype")
    if reuse is not None and (reuse[0].dtype != rows.dtype or reuse[0].shape[-1] != w):
        raise ValueError("gather_rows: the rows kept must have the rows' width and dtype")
    if copy_slots is not None:
        copy_slots = copy_slots.contiguous()
    kept, kpos, kslots = (
        (x.contiguous() for x in reuse) if reuse is not None else (out, pages, pages)
    )
    if out.numel():
        _gather_rows_kernel[(b * h, triton.cdiv(k, _ROWS_PER_PROGRAM))](
            _arg(rows, pages.device),
            pages,
            idx.contiguous(),
            out,
            out if copies is None else copies,
            pages if copies is None else copy_slots,
            kept,
            kpos,
            kslots,
            h,
            k,
            _page_stride(rows),
            pages.stride(0),
            0 if copies is None else _page_stride(copies),
            0 if copies is None else copy_slots.stride(0),
            kept.shape[2] if reuse is not None else 1,
            W=w,
            OW=out_width,
            T=t,
            BLOCK_K=_ROWS_PER_PROGRAM,
            BLOCK_W=triton.next_power_of_2(w),
            COPIES=copies is not None,
            REUSE=reuse is not None,
            CHUNK=_KEPT_CHUNK,
            # with rows kept: every source's rows start at multiples of 16 bytes (the kernel's hint must hold)
            ALIGNED=reuse is not None
            and w * rows.element_size() % 16 == 0
            and all(
                x.data_ptr() % 16 == 0 for x in (rows, kept, out if copies is None else copies)
            ),
        )
    return out
