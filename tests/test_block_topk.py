"""Stage 2's top-k by blocks: the Triton kernels held exactly to the reference (token_topk's positions and valid
slots; the set does not depend on the blocks), at awkward shapes: 3 KV heads, lengths off the block and off a
program's tile, blocks of 13 and of 1, more selected blocks than one tile holds, k and k_r above the length, k_r 0,
ranges that hold fewer than k scores, -inf and -0.0 inside the range, and many ties, where the blocks holding the
lowest-placed ties must be the ones selected."""

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import block_topk, token_topk

CASES = [  # b, h, n, k, chunk, begin, end, k_rows
    (1, 3, 1000, 16, 32, 4, 993, None),
    (
        2,
        3,
        2100,
        40,
        13,
        [0, 17],
        [2100, 1900],
        [40, 15],
    ),  # blocks of 13; 162 blocks, the last short
    (
        3,
        1,
        2049,
        4000,
        32,
        [1, 0, 5],
        [2049, 2049, 100],
        [3000, 7, 0],
    ),  # k above n: every block; k_r 0
    (
        2,
        2,
        700,
        50,
        8,
        [600, 0],
        [640, 700],
        None,
    ),  # 40 scores in row 0's range: 10 slots not valid
    (2, 3, 300, 9, 1, 5, 290, [[9, 9], [4, 9]]),  # blocks of 1; one range; k_r a strided column
    (1, 2, 20000, 300, 32, 100, 19999, None),  # 300 blocks of 32: three tiles of candidates
]


def _scores(b, h, n, seed, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:  # many equal scores: the k-th place falls among ties in many blocks
        return torch.randint(-3, 4, (b, h, n), generator=g).float()
    return torch.randn(b, h, n, generator=g)


def _k_rows(k_rows):
    if k_rows is None:
        return None
    return torch.tensor(k_rows)[:, 0] if isinstance(k_rows[0], list) else torch.tensor(k_rows)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("b,h,n,k,chunk,begin,end,k_rows", CASES)
def test_triton_selects_what_the_reference_selects(
    b, h, n, k, chunk, begin, end, k_rows, ties, monkeypatch
):
    kt = triton_module("block_topk_triton")
    empty = torch.empty  # what the kernels leave unwritten shows: new tensors start full of 85
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(85))
    scores = _scores(b, h, n, n + chunk, ties)
    scores[0, 0, 10:20] = float("-inf")
    scores[0, -1, 30:40] = -0.0
    lo, hi, kr = torch.tensor(begin), torch.tensor(end), _k_rows(k_rows)
    want = block_topk.top_positions(scores, lo, hi, k, kr, chunk)
    got = kt.top_positions(
        *(x.to(DEVICE) for x in (scores, lo, hi)), k, kr if kr is None else kr.to(DEVICE), chunk
    )
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_the_reference_is_token_topks_whatever_the_blocks():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-2, 3, (2, 3, 500), generator=g).float()
    lo, hi, kr = torch.tensor([3, 0]), torch.tensor([500, 250]), torch.tensor([20, 5])
    want = token_topk.top_positions(scores, lo, hi, 20, kr)
    for chunk in (1, 7, 32):
        got = block_topk.top_positions(scores, lo, hi, 20, kr, chunk)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
