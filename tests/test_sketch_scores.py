"""Token scores from the GPU-resident key sketch: the Triton kernel held to the torch reference, the reference held
to the dot product with exactly dequantized keys and to the true keys within the quantization error. Awkward
shapes: head_dim 64, 3 KV heads, 12 channels (not a power of two), rows of different page counts, -1 page-table
padding."""

import pytest
import torch
from triton_kernels import CUDA, DEVICE, triton_module  # noqa: F401

from tailorkv.kernels import block_maxima, kivi  # noqa: E402
from tailorkv.kernels import sketch_scores as ref  # noqa: E402


@pytest.fixture(scope="module")
def kt():
    return triton_module("sketch_scores_triton")


def _case(b, h, d, t, num_pages, bits, c, seed=0):
    """Random keys per page quantized into a sketch; rows own random pages (the last rows fewer: padding -1) and
    score c random channels per head."""
    gen = torch.Generator().manual_seed(seed)
    keys = (
        torch.randn(num_pages, h, t, d, generator=gen) * torch.rand(1, 1, 1, d, generator=gen) * 3
    )
    q = kivi.quantize_keys(keys.reshape(-1, t, d), bits, ref.GROUP)
    # channel-major, as OffloadStore keeps them
    packed, scale, zero = (
        x.view(num_pages, h, -1, d).transpose(-1, -2).contiguous().to(DEVICE) for x in q
    )
    n = num_pages // b
    pages = torch.randperm(num_pages, generator=gen)[: b * n].view(b, n)
    for i in range(1, b):
        pages[i, n - i :] = -1
    channels = torch.rand(b, h, d, generator=gen).argsort(-1)[..., :c]
    qc = torch.randn(b, h, c, generator=gen)
    return keys, qc.to(DEVICE), channels.to(DEVICE), packed, scale, zero, pages.to(DEVICE)


CASES = [
    (1, 1, 64, 256, 3, 1, 8),
    (3, 3, 64, 256, 9, 2, 12),
    (2, 2, 128, 256, 6, 1, 128),  # every channel of head_dim 128
    (4, 2, 64, 64, 13, 2, 1),
]


@pytest.mark.parametrize("b,h,d,t,num_pages,bits,c", CASES)
def test_reference_scores_dequantized_keys(b, h, d, t, num_pages, bits, c):
    keys, qc, channels, packed, scale, zero, pages = (
        x.cpu() for x in _case(b, h, d, t, num_pages, bits, c)
    )
    scores = ref.sketch_scores(qc, channels, packed, scale, zero, pages, bits).view(b, h, -1, t)
    # the query spread over all channels, zero off the chosen ones
    qd = torch.zeros(b, h, d).scatter_(-1, channels, qc)
    kivi_layout = (x.transpose(-1, -2).flatten(0, 1) for x in (packed, scale, zero))
    deq = kivi.dequantize_keys(
        kivi.QuantizedKeys(*kivi_layout),
        bits,
        ref.GROUP,
        t,
    ).view(num_pages, h, t, d)
    for i in range(b):
        for j, p in enumerate(pages[i].tolist()):
            if p < 0:
                assert (scores[i, :, j] == 0).all()
                continue
            torch.testing.assert_close(
                scores[i, :, j], torch.einsum("hd,htd->ht", qd[i], deq[p]), rtol=1e-5, atol=1e-4
            )
            # within half a quantization step per channel of the scores of the true keys
            step = keys[p].unflatten(1, (-1, ref.GROUP)).amax(2) - keys[p].unflatten(
                1, (-1, ref.GROUP)
            ).amin(2)
            bound = (qd[i].abs()[:, None] * step / (2**bits - 1) / 2).sum(-1) + 1e-2  # [h, groups]
            err = (
                (scores[i, :, j] - torch.einsum("hd,htd->ht", qd[i], keys[p]))
                .abs()
                .unflatten(1, (-1, ref.GROUP))
            )
            assert (err <= bound[..., None]).all()


@pytest.mark.parametrize("b,h,d,t,num_pages,bits,c", CASES)
def test_triton_matches_reference(kt, b, h, d, t, num_pages, bits, c):
    _, qc, channels, packed, scale, zero, pages = _case(b, h, d, t, num_pages, bits, c)
    got = kt.sketch_scores(qc, channels, packed, scale, zero, pages, bits)
    expect = ref.sketch_scores(qc, channels, packed, scale, zero, pages, bits)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "b,h,d,t,num_pages,bits,c,chunk",
    [(*CASES[1], 32), (*CASES[1], 16), (*CASES[1], 24), (*CASES[3], 64), (*CASES[3], 32)],
)
def test_triton_maxima_are_block_maximas_of_its_scores(kt, b, h, d, t, num_pages, bits, c, chunk):
    """The block maxima the kernel takes in its launch (chunk 32, 16, 64: dividing a page, 64 a whole page of 64
    tokens; 24: block_maxima's kernel after it) are exactly block_maxima's of the scores it stored, each row's range
    cutting pages and blocks (one range empty, one past the row's pages, one whose first and last blocks hold one
    position of it), and the scores those of sketch_scores."""
    _, qc, channels, packed, scale, zero, pages = _case(b, h, d, t, num_pages, bits, c)
    n = pages.shape[1] * t
    # row 0: its first and last blocks hold one position of the range each
    begin = torch.tensor([chunk - 1, 0, 70, 3][:b], device=DEVICE)
    end = torch.tensor([n - chunk + 1 - n % chunk, n, 70, 2 * n][:b], device=DEVICE)
    scores, maxima = kt.sketch_scores_and_maxima(
        qc, channels, packed, scale, zero, pages, bits, begin, end, chunk
    )
    assert torch.equal(scores, kt.sketch_scores(qc, channels, packed, scale, zero, pages, bits))
    assert torch.equal(maxima, block_maxima.block_maxima(scores, begin, end, chunk))
    ref_scores, ref_maxima = ref.sketch_scores_and_maxima(
        qc, channels, packed, scale, zero, pages, bits, begin, end, chunk
    )
    torch.testing.assert_close(maxima, ref_maxima, rtol=1e-5, atol=1e-4)
    assert maxima.isinf().any() and maxima.isfinite().any()
