"""Host-tier moves (copy_pages, stage-1 gather_channels, top-k gather_rows): the Triton kernels held equal to the
torch reference, which is itself checked against plain indexing. Shapes are awkward on purpose: 3 KV heads,
head_dim 64, page counts and top-k sizes that fill no block. Without CUDA the kernels run in the Triton interpreter
on CPU; with CUDA the source lives in pinned host memory and the kernels read it through UVA.
"""

import pytest
import torch
from triton_kernels import CUDA, DEVICE, triton_module  # noqa: F401

from tailorkv.kernels import host_copy as ref  # noqa: E402

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def kt():
    return triton_module("host_copy_triton")


def _host(*shape, dtype, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.pin_memory() if CUDA else x


def _pages(b, np_, total, seed=1):
    """Page tables [b, np_]; row i > 0 has its last i entries padded with -1 (no page)."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.stack([torch.randperm(total, generator=g)[:np_] for _ in range(b)])
    for i in range(1, b):
        pages[i, max(1, np_ - i) :] = -1
    return pages.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64, 128), (3, 16, 64), (1, 5000)])
def test_copy_pages_both_ways(kt, dtype, shape):
    host = _host(11, *shape, dtype=dtype)
    src_pages = torch.tensor([7, 2, 9, 0, 5], device=DEVICE)
    dev = torch.zeros(6, *shape, dtype=dtype, device=DEVICE)
    kt.copy_pages(host, src_pages, dev, torch.tensor([4, 0, 1, 5, 2], device=DEVICE))  # host -> GPU
    torch.testing.assert_close(dev[[4, 0, 1, 5, 2]].cpu(), host[[7, 2, 9, 0, 5]], rtol=0, atol=0)
    assert (dev[3] == 0).all()
    back = _host(11, *shape, dtype=dtype, seed=3)
    expect = back.clone()
    kt.copy_pages(
        dev, torch.tensor([0, 1], device=DEVICE), back, torch.tensor([10, 3], device=DEVICE)
    )  # GPU -> host
    expect[[10, 3]] = dev[[0, 1]].cpu()
    torch.testing.assert_close(back, expect, rtol=0, atol=0)
    ref_dst = torch.zeros_like(dev)
    ref.copy_pages(host, src_pages, ref_dst, torch.tensor([4, 0, 1, 5, 2], device=DEVICE))
    torch.testing.assert_close(ref_dst[[4, 0, 1, 5, 2]], dev[[4, 0, 1, 5, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_pages_skips_pages_without_a_destination(kt, dtype):
    """A destination page < 0 (a resident page's prompt rows, which live on the GPU alone) is neither read nor
    written; the other pages are copied."""
    host = _host(11, 3, 16, 64, dtype=dtype)
    for ops in (kt, ref):
        dev = torch.zeros(6, 3, 16, 64, dtype=dtype, device=DEVICE)
        ops.copy_pages(
            host,
            torch.tensor([7, 2, 9], device=DEVICE),
            dev,
            torch.tensor([4, -1, 1], device=DEVICE),
        )
        torch.testing.assert_close(dev[[4, 1]].cpu(), host[[7, 9]], rtol=0, atol=0)
        assert (dev[[0, 2, 3, 5]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,np_,h,d,t,c", [(1, 1, 1, 64, 64, 1), (2, 9, 3, 64, 64, 5), (3, 13, 3, 128, 256, 12)]
)
def test_gather_channels_matches_reference(kt, dtype, b, np_, h, d, t, c):
    k_t = _host(17, h, d, t, dtype=dtype)
    pages = _pages(b, np_, 17)
    channels = (
        torch.stack(
            [
                torch.randperm(d, generator=torch.Generator().manual_seed(i))[:c]
                for i in range(b * h)
            ]
        )
        .view(b, h, c)
        .to(DEVICE)
    )
    got = kt.gather_channels(k_t, pages, channels)
    expect = ref.gather_channels(k_t, pages, channels)
    assert got.shape == expect.shape == (b, h, c, np_ * t) and got.device.type == DEVICE
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    out = torch.full(
        got.shape, 7.0, device=DEVICE
    )  # float32 whatever the source: what stage 2 scores in
    assert kt.gather_channels(k_t, pages, channels, out=out) is out
    torch.testing.assert_close(out, expect.float(), rtol=0, atol=0)
    padded = (pages < 0).repeat_interleave(t, 1)[:, None, None].expand_as(expect)
    assert (expect[padded] == 0).all()  # no page: zeros
    # the reference against plain indexing: row 0, head h-1, channel slot c-1, token 5 of page slot np_-1
    p, ch = pages[0, -1].item(), channels[0, h - 1, c - 1].item()
    assert expect[0, h - 1, c - 1, (np_ - 1) * t + 5] == k_t[p, h - 1, ch, 5].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,np_,h,t,w,k", [(1, 1, 1, 64, 128, 1), (2, 7, 3, 64, 128, 45), (3, 5, 3, 256, 256, 130)]
)
def test_gather_rows_matches_reference(kt, dtype, b, np_, h, t, w, k):
    rows = _host(12, t, h, w, dtype=dtype)  # token-major pages
    pages = _pages(b, np_, 12)
    g = torch.Generator().manual_seed(5)
    idx = (
        torch.stack([torch.randperm(np_ * t, generator=g)[:k] for _ in range(b * h)])
        .view(b, h, k)
        .to(DEVICE)
    )
    got = kt.gather_rows(rows, pages, idx)
    expect = ref.gather_rows(rows, pages, idx)
    assert got.shape == expect.shape == (b, h, k, w)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    no_page = pages.gather(1, (idx // t).view(b, -1)).view(b, h, k) < 0
    assert (expect[no_page] == 0).all()
    pos = idx[0, h - 1, k - 1].item()
    torch.testing.assert_close(
        expect[0, h - 1, k - 1], rows[pages[0, pos // t].item(), pos % t, h - 1].to(DEVICE)
    )


@pytest.mark.parametrize("dtype", [*DTYPES, torch.uint8])  # uint8: fp8 host rows
@pytest.mark.parametrize("b,np_,h,t,w,k", [(2, 7, 3, 64, 128, 45), (3, 5, 3, 256, 260, 130)])
def test_gather_rows_reads_pages_with_a_gpu_copy_from_it(kt, dtype, b, np_, h, t, w, k):
    """Pages with a copy slot are read from the copies (which hold other values here, so the source shows), the
    others from the host rows, padding pages as zeros; the kernel equals the reference bit for bit."""
    rows = _host(12, t, h, w, dtype=dtype)
    copies = (
        torch.randn(4, t, h, w, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    )
    pages = _pages(b, np_, 12)
    slots = torch.full((b, np_), -1, dtype=torch.long)
    slots[:, ::2] = torch.arange(0, (np_ + 1) // 2)[None] % 4
    slots = slots.masked_fill(pages.cpu() < 0, -1).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    idx = (
        torch.stack([torch.randperm(np_ * t, generator=g)[:k] for _ in range(b * h)])
        .view(b, h, k)
        .to(DEVICE)
    )
    got = kt.gather_rows(rows, pages, idx, copies, slots)
    expect = ref.gather_rows(rows, pages, idx, copies, slots)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    plain = ref.gather_rows(rows, pages, idx)
    slot = slots.gather(1, (idx // t).view(b, -1)).view(b, h, k)
    assert (slot >= 0).any() and (slot < 0).any()
    torch.testing.assert_close(expect[slot < 0], plain[slot < 0], rtol=0, atol=0)
    heads = torch.arange(h, device=DEVICE)[None, :, None].expand(b, h, k)
    on_gpu = slot >= 0
    torch.testing.assert_close(
        expect[on_gpu], copies[slot[on_gpu], (idx % t)[on_gpu], heads[on_gpu]], rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])  # uint8: fp8 host rows
@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize(
    "b,np_,h,t,w,k,n", [(2, 7, 3, 64, 128, 45, 24), (3, 5, 3, 256, 260, 130, 40)]
)
def test_gather_rows_reads_rows_kept_from_the_last_step_there(
    kt, dtype, copied, b, np_, h, t, w, k, n
):
    """Rows whose position a row's slot keeps (for its head) come from the rows kept there (other values here, so
    the source shows), before a page's GPU copy; the rest as without them. The kernel equals the reference bit for
    bit."""
    rows = _host(12, t, h, w, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    kept = torch.randn(5, h, n, w, generator=g).to(dtype).to(DEVICE)
    copies, slots = None, None
    if copied:
        copies = torch.randn(4, t, h, w, generator=g).to(dtype).to(DEVICE)
        slots = (torch.arange(b * np_).view(b, np_) % 4).to(DEVICE)
    pages = _pages(b, np_, 12)
    kslots = torch.tensor([4, 0, 2][:b], device=DEVICE)
    idx = (
        torch.stack([torch.randperm(np_ * t, generator=g)[:k] for _ in range(b * h)])
        .view(b, h, k)
        .to(DEVICE)
    )
    # each slot and head keeps n positions: about half of them this step's, the rest others (-1 or past the
    # context), in no order
    kept_pos = torch.full((5, h, n), -1, dtype=torch.long)
    for i, s in enumerate(kslots.tolist()):
        for x in range(h):
            mine = idx[i, x, torch.randperm(k, generator=g)[: n // 2]].cpu()
            other = np_ * t + torch.arange(n - n // 2 - 1)
            kept_pos[s, x] = torch.cat([mine, other, torch.tensor([-1])])[
                torch.randperm(n, generator=g)
            ]
    kept_pos = kept_pos.to(DEVICE)
    reuse = (kept, kept_pos, kslots)
    got = kt.gather_rows(rows, pages, idx, copies, slots, reuse)
    expect = ref.gather_rows(rows, pages, idx, copies, slots, reuse)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    plain = ref.gather_rows(rows, pages, idx, copies, slots)
    eq = idx[..., :, None] == kept_pos[kslots][:, :, None, :]
    hit, at = eq.any(-1), eq.to(torch.uint8).argmax(-1)
    assert hit.sum() == b * h * (n // 2)
    torch.testing.assert_close(expect[~hit], plain[~hit], rtol=0, atol=0)
    heads = torch.arange(h, device=DEVICE)[None, :, None].expand(b, h, k)
    rslot = kslots[:, None, None].expand(b, h, k)
    torch.testing.assert_close(expect[hit], kept[rslot[hit], heads[hit], at[hit]], rtol=0, atol=0)


def test_ops_dispatch():
    assert ref.ops("cpu") is ref


@pytest.mark.skipif(not CUDA, reason="pageable host memory is only refused on CUDA")
def test_pageable_host_memory_is_refused(kt):
    with pytest.raises(ValueError, match="pinned"):
        kt.gather_rows(
            torch.zeros(2, 64, 1, 128),
            torch.zeros(1, 1, dtype=torch.long, device="cuda"),
            torch.zeros(1, 1, 1, dtype=torch.long, device="cuda"),
        )
