"""The offloaded layers' decode attention over [window | generated | fetched top-k]: the Triton kernel held to the
torch reference, which is held to plain attention over the valid tokens. Awkward shapes: GQA group 3, head_dim 64,
token counts that fill no tile; masked slots hold NaN."""

import pytest
import torch
from triton_kernels import CUDA, DEVICE, triton_module  # noqa: F401

from tailorkv.kernels import sparse_attention as ref  # noqa: E402
from tailorkv.kernels.attention import grouped_attention  # noqa: E402


@pytest.fixture(scope="module")
def kt():
    return triton_module("sparse_attention_triton")


def _case(b, hq, h, d, w, g, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEVICE)  # noqa: E731
    win_k, win_v = rnd(b + 2, w, h, d), rnd(b + 2, w, h, d)
    gen_k, gen_v = rnd(40, h, d), rnd(40, h, d)
    slots = torch.randperm(b + 2, generator=gen)[:b].to(DEVICE)
    win_mask = (torch.arange(w) < torch.randint(1, w + 1, (b, 1), generator=gen)).to(DEVICE)
    gen_read = torch.randint(0, 40, (b, g), generator=gen).to(DEVICE)
    gen_mask = (torch.arange(g) < torch.randint(0, g + 1, (b, 1), generator=gen)).to(DEVICE)
    fetched = rnd(b, h, k, 2 * d)
    valid = (torch.rand(b, h, k, generator=gen) < 0.7).to(DEVICE)
    # stale memory in what the masks leave out: never read
    for i in range(b):
        win_k[slots[i], ~win_mask[i]] = float("nan")
    fetched[~valid] = float("nan")
    return (
        rnd(b, hq, d),
        win_k,
        win_v,
        slots,
        win_mask,
        gen_k,
        gen_v,
        gen_read,
        gen_mask,
        fetched,
        valid,
        d**-0.5,
    )


CASES = [
    (1, 3, 1, 64, 1, 0, 0),
    (3, 9, 3, 64, 37, 5, 45),
    (2, 32, 8, 128, 64, 70, 128),
    (4, 12, 4, 64, 8, 33, 1),
]


@pytest.mark.parametrize("b,hq,h,d,w,g,k", CASES)
def test_reference_is_attention_over_the_valid_tokens(b, hq, h, d, w, g, k):
    case = _case(b, hq, h, d, w, g, k, torch.float32)
    q, win_k, win_v, slots, win_mask, gen_k, gen_v, gen_read, gen_mask, fetched, valid, scale = case
    out = ref.sparse_decode_attention(*case)
    assert out.isfinite().all()
    i, head = b - 1, h - 1
    keys = torch.cat(
        [
            win_k[slots[i], win_mask[i], head],
            gen_k[gen_read[i][gen_mask[i]], head],
            fetched[i, head, valid[i, head], :d],
        ]
    )
    values = torch.cat(
        [
            win_v[slots[i], win_mask[i], head],
            gen_v[gen_read[i][gen_mask[i]], head],
            fetched[i, head, valid[i, head], d:],
        ]
    )
    g_ = hq // h
    expect = grouped_attention(q[i, head * g_ : (head + 1) * g_], keys[None], values[None], scale)
    torch.testing.assert_close(out[i, head * g_ : (head + 1) * g_], expect, rtol=1e-5, atol=1e-5)


# never split; the default, where every case splits
@pytest.mark.parametrize("split_programs", [1, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if CUDA else [torch.float32])
@pytest.mark.parametrize("b,hq,h,d,w,g,k", CASES)
def test_triton_matches_reference(kt, monkeypatch, split_programs, dtype, b, hq, h, d, w, g, k):
    monkeypatch.setattr(kt, "_SPLIT_PROGRAMS", split_programs)
    case = _case(b, hq, h, d, w, g, k, dtype)
    got = kt.sparse_decode_attention(*case)
    expect = ref.sparse_decode_attention(
        *(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in case)
    )
    assert got.dtype == dtype and got.shape == expect.shape
    err = ((got.float() - expect).abs().max() / expect.abs().max()).item()
    assert err <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_short_steps_split_the_fetched_rows(kt):
    """Batch 1 at 8 KV heads: the window and generated tokens in one split, each tile of 128 fetched rows in one
    of its own; 16 rows x 8 heads are programs enough, unsplit; splits never overlap or leave a row out."""
    assert kt._splits(1, 8, 128) == (5, 32)
    assert kt._splits(4, 8, 128) == (3, 64)
    assert kt._splits(16, 8, 128) == (1, 128)
    assert kt._splits(1, 8, 0)[0] == 1
    for b, h, k in [(1, 3, 45), (2, 8, 100), (1, 1, 1)]:
        splits, chunk = kt._splits(b, h, k)
        assert chunk % kt._BLOCK_T == 0 and (splits - 1) * chunk >= k > (splits - 2) * chunk


@pytest.mark.parametrize("split_programs", [1, 4096])
def test_a_row_with_nothing_to_attend_is_zero(kt, monkeypatch, split_programs):
    """A padding row (no window, generated or fetched token valid) reads 0 in both paths, as the unsplit kernel
    always gave: its splits are all empty, which the merge must weigh as nothing, not NaN."""
    monkeypatch.setattr(kt, "_SPLIT_PROGRAMS", split_programs)
    case = list(_case(2, 9, 3, 64, 37, 5, 45, torch.float32))
    for m in (4, 8, 10):  # win_mask, gen_mask, valid
        case[m] = case[m].clone()
        case[m][1] = False
    got = kt.sparse_decode_attention(*case)
    assert torch.equal(got[1].cpu(), torch.zeros_like(got[1].cpu()))
    want = ref.sparse_decode_attention(*case)
    assert ((got[0].cpu() - want[0].cpu()).abs().max() / want[0].abs().max()).item() <= 1e-5
