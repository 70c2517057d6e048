"""The two-stage top-k's block maxima: the Triton kernel held to the torch reference exactly, the reference to a
block-by-block maximum of the range. Awkward shapes: 3 KV heads, lengths off the block and off a program's tile,
blocks of 13 (not a power of 2) and of 1, a row shorter than a block, ranges that start and end mid-block, an
empty range, no leading dims, two leading dims."""

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import block_maxima as ref

CASES = [  # leading dims, h, n, chunk, begin, end
    ((2,), 3, 1000, 32, [0, 17], [1000, 990]),
    ((3,), 3, 2049, 13, [5, 0, 1300], [2049, 2049, 1301]),  # one position in row 2's range
    ((), 3, 700, 32, 40, 641),  # [H, L] with a 0-d range
    ((2,), 1, 20, 32, [0, 3], [20, 19]),  # a row shorter than one block
    ((2,), 2, 1100, 1, [0, 500], [1100, 500]),  # blocks of one; an empty range
    ((2, 2), 3, 4100, 64, [[0, 7], [64, 100]], [[4100, 4000], [4096, 4099]]),  # five programs a row
]


def _case(lead, h, n, begin, end, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, h, n, generator=g), torch.tensor(begin), torch.tensor(end)


def _blockwise(scores, begin, end, chunk):
    """Each block's maximum over its positions inside [begin, end), one block at a time."""
    lead, (h, n) = scores.shape[:-2], scores.shape[-2:]
    rows = scores.reshape(-1, h, n)
    ranges = [
        (begin.expand(lead).reshape(-1)[i], end.expand(lead).reshape(-1)[i])
        for i in range(len(rows))
    ]
    out = torch.full((len(rows), h, -(-n // chunk)), float("-inf"))
    for i, (lo, hi) in enumerate(ranges):
        for blk in range(out.shape[-1]):
            a, b = max(blk * chunk, int(lo)), min((blk + 1) * chunk, int(hi), n)
            if a < b:
                out[i, :, blk] = rows[i, :, a:b].amax(-1)
    return out.view(*lead, h, -1)


@pytest.mark.parametrize("lead,h,n,chunk,begin,end", CASES)
def test_reference_is_each_blocks_maximum_inside_the_range(lead, h, n, chunk, begin, end):
    scores, lo, hi = _case(lead, h, n, begin, end, seed=n)
    assert torch.equal(ref.block_maxima(scores, lo, hi, chunk), _blockwise(scores, lo, hi, chunk))


@pytest.mark.parametrize("lead,h,n,chunk,begin,end", CASES)
def test_triton_computes_what_the_reference_computes(lead, h, n, chunk, begin, end, monkeypatch):
    bm = triton_module("block_maxima_triton")
    empty = torch.empty  # what the kernel leaves unwritten shows: new tensors start full of 85
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(85))
    scores, lo, hi = _case(lead, h, n, begin, end, seed=n)
    want = ref.block_maxima(scores, lo, hi, chunk)
    got = bm.block_maxima(*(x.to(DEVICE) for x in (scores, lo, hi)), chunk)
    assert torch.equal(got.cpu(), want)


def test_triton_reads_a_strided_view_of_the_scores():
    """Scores whose rows sit inside a wider buffer: the kernel reads each row from its stride."""
    bm = triton_module("block_maxima_triton")
    wide = torch.randn(2, 3, 1200)
    scores, lo, hi = wide[..., :1000], torch.tensor([0, 9]), torch.tensor([1000, 999])
    want = ref.block_maxima(scores, lo, hi, 32)
    assert torch.equal(
        bm.block_maxima(scores.to(DEVICE), lo.to(DEVICE), hi.to(DEVICE), 32).cpu(), want
    )
