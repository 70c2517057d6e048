"""Stage 2's top-k in position order: the Triton radix select held to the torch reference exactly (positions and
valid slots), the reference to torch.topk's set on distinct scores, ties taken lowest position first. Awkward
shapes: 3 KV heads, lengths off the 1,024-score block and over one program's chunk, k above the length, rows with
k_r 0, ranges that hold fewer than k scores, -inf and -0.0 inside the range."""

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import token_topk as ref


@pytest.fixture(scope="module")
def kt():
    return triton_module("token_topk_triton")


def _case(b, h, n, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    scores = (
        torch.randint(-3, 4, (b, h, n), generator=g).float()  # many equal scores
        if ties
        else torch.randn(b, h, n, generator=g)
    )
    return scores


def _k_rows(k_rows):
    """None, a list, or a column of a [B, 2] table (as the engine passes each S layer's k of its rows)."""
    if k_rows is None:
        return None
    return torch.tensor(k_rows)[:, 0] if isinstance(k_rows[0], list) else torch.tensor(k_rows)


def awkward_call(monkeypatch, b, h, n, k, begin, end, k_rows, ties):
    """A case's scores (-inf and -0.0 inside the range), range and k_rows, and the reference's answer; new tensors
    start full of 85 from here on, so what a kernel leaves unwritten shows."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(85))
    scores = _case(b, h, n, seed=n, ties=ties)
    scores[0, 0, 10:20] = float("-inf")
    scores[0, -1, 30:40] = -0.0
    lo, hi = torch.tensor(begin), torch.tensor(end)
    kr = _k_rows(k_rows)
    return scores, lo, hi, kr, ref.top_positions(scores, lo, hi, k, kr)


CASES = [  # b, h, n, k, begin, end, k_rows
    (1, 3, 1000, 64, 4, 993, None),
    (2, 3, 2100, 300, [0, 17], [2100, 1900], [300, 150]),  # 3 programs a row
    (3, 1, 2049, 4000, [1, 0, 5], [2049, 2049, 100], [3000, 7, 0]),  # k and k_r above n; k_r 0
    (2, 2, 700, 50, [600, 0], [640, 700], None),  # 40 scores in row 0's range: 10 slots not valid
    (2, 3, 300, 40, 5, 290, [[40, 9], [20, 9]]),  # one range for both rows; k_r a strided column
    (2, 1, 1500, 64, 0, 1500, [100, 30]),  # k_r above k, under n (many ties)
    (2, 1, 1500, 64, 0, 1500, [100, 30]),  # the same, distinct scores
]


@pytest.mark.parametrize(
    "b,h,n,k,begin,end,k_rows,ties", [(*c, i % 2 == 1) for i, c in enumerate(CASES)]
)  # many ties in the rows of 3 programs (the ranks of ties run across programs) and of 40 scores in range
def test_triton_selects_what_the_reference_selects(
    kt, b, h, n, k, begin, end, k_rows, ties, monkeypatch
):
    scores, lo, hi, kr, want = awkward_call(monkeypatch, b, h, n, k, begin, end, k_rows, ties)
    kr = kr if kr is None else kr.to(DEVICE)
    given = kr if kr is None else kr.clone()
    got = kt.top_positions(*(x if x is None else x.to(DEVICE) for x in (scores, lo, hi)), k, kr)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert given is None or torch.equal(kr, given)  # the caller's k_rows left as they were


@pytest.mark.parametrize("b,h,n,k,begin,end,k_rows", CASES)
def test_reference_is_torch_topk_of_the_range_in_position_order(b, h, n, k, begin, end, k_rows):
    scores = _case(b, h, n, seed=n)
    kr_rows = _k_rows(k_rows)
    positions, valid = ref.top_positions(scores, torch.tensor(begin), torch.tensor(end), k, kr_rows)
    k_rows = None if kr_rows is None else kr_rows.tolist()
    kk = min(k, n)
    assert positions.shape == valid.shape == (b, h, kk)
    for i in range(b):
        lo, hi = (x[i] if isinstance(x, list) else x for x in (begin, end))
        kr = min(k_rows[i], kk) if k_rows else kk
        for j in range(h):
            inside = torch.full((n,), float("-inf"))
            inside[lo:hi] = scores[i, j, lo:hi]
            top = inside.topk(kr) if kr else None
            want = sorted(top.indices[top.values > float("-inf")].tolist()) if kr else []
            assert positions[i, j][valid[i, j]].tolist() == want  # ascending
            assert not valid[i, j, kr:].any() and not positions[i, j, kr:].any()


def test_ties_at_the_kth_score_take_the_lowest_positions():
    scores = torch.tensor([[[1.0, 5.0, 1.0, 1.0, 0.0, 1.0, -0.0, 0.0]]])
    positions, valid = ref.top_positions(scores, torch.tensor(0), torch.tensor(8), 3)
    assert positions.tolist() == [[[0, 1, 2]]] and valid.all()
    # -0.0 ties with 0.0: positions 4 and 6 before 7
    positions, _ = ref.top_positions(scores, torch.tensor(0), torch.tensor(8), 7)
    assert positions.tolist() == [[[0, 1, 2, 3, 4, 5, 6]]]
