"""Stage 2's top-k by blocks in one program a row: the Triton kernel held to token_topk's reference exactly
(positions and valid slots) at token_topk's awkward cases (3 KV heads, lengths off the block, k above the length,
k_r 0 and above k, ranges that hold fewer than k scores, many ties, -inf and -0.0 inside the range), for blocks of
32, of a size that is no power of two, of 1 and longer than the row."""

import pytest
import torch
from test_token_topk import CASES, awkward_call
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import block_maxima, block_topk


@pytest.fixture(scope="module")
def bt():
    return triton_module("block_topk_triton")


@pytest.mark.parametrize("chunk", [32, 24, 1, 4096])
@pytest.mark.parametrize(
    "b,h,n,k,begin,end,k_rows,ties", [(*c, i % 2 == 1) for i, c in enumerate(CASES)]
)
def test_triton_selects_what_the_reference_selects(
    bt, b, h, n, k, begin, end, k_rows, ties, chunk, monkeypatch
):
    if not bt.fits(n, min(k, n), chunk):
        pytest.skip("the tiles do not hold this shape: the caller takes another path")
    scores, lo, hi, kr, want = awkward_call(monkeypatch, b, h, n, k, begin, end, k_rows, ties)
    assert all(
        torch.equal(w, g) for w, g in zip(want, block_topk.top_positions(scores, lo, hi, k, kr))
    )
    kr = kr if kr is None else kr.to(DEVICE)
    got = bt.top_positions(*(x.to(DEVICE) for x in (scores, lo, hi)), k, kr, chunk=chunk)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    # the caller's maxima (the sketch kernel's, in the engine) in place of the kernel's own
    maxima = block_maxima.block_maxima(scores, lo, hi, chunk).to(DEVICE)
    given = bt.top_positions(
        *(x.to(DEVICE) for x in (scores, lo, hi)), k, kr, chunk=chunk, maxima=maxima
    )
    assert torch.equal(given[0], got[0]) and torch.equal(given[1], got[1])


def test_the_callers_maxima_choose_the_blocks(bt):
    """Given maxima all equal, the two blocks taken are the first two (ties: lowest first), though the largest
    scores lie in the last block: the kernel ranks the blocks by the maxima it is given."""
    scores = torch.arange(256.0).view(1, 1, 256).to(DEVICE)
    lo, hi = torch.tensor(0, device=DEVICE), torch.tensor(256, device=DEVICE)
    pos, valid = bt.top_positions(scores, lo, hi, 2, chunk=32)
    assert pos.flatten().tolist() == [254, 255] and valid.all()
    flat = torch.zeros(1, 1, 8, device=DEVICE)
    pos, valid = bt.top_positions(scores, lo, hi, 2, chunk=32, maxima=flat)
    assert pos.flatten().tolist() == [62, 63] and valid.all()


def test_blocks_tied_at_the_kth_maximum_take_the_lowest_first(bt):
    """Every block's maximum the same (5.0): the k blocks taken must be the first ones, whose positions hold the
    lowest tied scores."""
    scores = torch.zeros(1, 1, 64)
    scores[0, 0, 3::8] = 5.0  # one 5.0 in each block of 8
    got = bt.top_positions(scores.to(DEVICE), torch.tensor(0), torch.tensor(64), 3, chunk=8)
    assert got[0].cpu().tolist() == [[[3, 11, 19]]] and got[1].all()


def test_fits_bounds_the_tiles(bt):
    assert bt.fits(131072, 128, 32) and bt.fits(262144, 128, 32)
    assert not bt.fits(524288, 128, 32)  # 16,384 blocks
    assert not bt.fits(131072, 896, 32)  # 896 blocks of 32
    with pytest.raises(ValueError, match="tiles"):
        bt.top_positions(
            torch.zeros(1, 1, 40000, device=DEVICE), torch.tensor(0), torch.tensor(1), 300
        )
