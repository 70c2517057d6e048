"""Stage 1 and stage 2 of TailorKV's retrieval against brute-force references on random data."""

import itertools

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import block_maxima
from tailorkv.kernels.attention import grouped_attention
from tailorkv.kvcache import selection
from tailorkv.kvcache.selection import group_mean, score_tokens, select_channels, select_tokens


@pytest.mark.parametrize("hq,hkv,d,ds", [(9, 3, 64, 8), (32, 8, 128, 12), (4, 4, 64, 1)])
def test_select_channels_brute_force(hq, hkv, d, ds):
    torch.manual_seed(hq)
    q_hat, max_abs = torch.randn(hq, d), torch.rand(hkv, d)
    got = select_channels(q_hat, max_abs, ds)
    g = hq // hkv
    for h in range(hkv):
        score = [
            abs(sum(q_hat[h * g + j, c].item() for j in range(g)) / g) * max_abs[h, c].item()
            for c in range(d)
        ]
        want = sorted(range(d), key=lambda c: -score[c])[:ds]
        assert set(got[h].tolist()) == set(want)


@pytest.mark.parametrize("seed", range(4))
def test_stage2_selection_brute_force_and_exclusions(seed):
    torch.manual_seed(seed)
    hq, hkv, d, ds, L = 9, 3, 64, 8, 301
    sink, recent, k = 8, 56, 37
    q, keys = torch.randn(hq, d), torch.randn(L, hkv, d)
    channels = torch.stack([torch.randperm(d)[:ds] for _ in range(hkv)])
    k_channels = torch.stack([keys[:, h, channels[h]].T for h in range(hkv)])  # [Hkv, d_s, L]
    scores = score_tokens(q, k_channels, channels)
    idx, valid = select_tokens(scores, sink, L - recent, k)
    assert valid.all()
    qm = group_mean(q, hkv)
    for h in range(hkv):
        brute = {
            t: sum(qm[h, c].item() * keys[t, h, c].item() for c in channels[h].tolist())
            for t in range(sink, L - recent)
        }
        want = sorted(brute, key=lambda t: -brute[t])[:k]
        assert set(idx[h].tolist()) == set(want)
        assert all(
            sink <= t < L - recent for t in idx[h].tolist()
        )  # never sink, recent or generated


def test_select_tokens_small_middle_marks_the_rest_invalid():
    scores = torch.randn(2, 20)
    idx, valid = select_tokens(scores, 8, 12, 100)
    assert idx.shape == (2, 20) and valid.sum(-1).tolist() == [4, 4]
    assert set(itertools.chain(*idx[valid].view(2, 4).tolist())) == {8, 9, 10, 11}
    assert not select_tokens(scores, 8, 8, 5)[1].any()


def test_batched_selection_equals_per_sequence():
    torch.manual_seed(1)
    scores = torch.randn(3, 2, 50)
    begin, end = torch.tensor([4, 8, 0]), torch.tensor([40, 20, 50])
    idx, valid = select_tokens(scores, begin, end, 10)
    for b in range(3):
        one, ok = select_tokens(scores[b], int(begin[b]), int(end[b]), 10)
        assert torch.equal(idx[b][valid[b]], one[ok]) and ok.all()


@pytest.mark.parametrize("kernel", ["reference", "block_maxima_triton"])
@pytest.mark.parametrize("chunk", [1, 7, 13])
def test_selection_by_blocks_picks_what_one_top_k_picks(chunk, kernel, monkeypatch):
    """topk_chunk: rows whose ranges and own k differ, a length off every block, 3 KV heads, a range that
    holds fewer positions than k (its -inf picks invalid), the last block short: the same valid tokens, rank by
    rank, as torch.topk over the masked row; with the block maxima from the reference and from the Triton kernel
    (what CUDA runs; in the interpreter here), called as the selection calls it."""
    device = "cpu"
    # on a GPU host the kernel runs on CUDA; the interpreter's on CPU tensors
    if kernel != "reference":
        module, device = triton_module(kernel), DEVICE
        monkeypatch.setattr(selection.block_maxima, "ops", lambda device: module)
    gen = torch.Generator().manual_seed(chunk)
    scores = torch.randn(4, 3, 997, generator=gen).to(device)
    begin, end = torch.tensor([4, 0, 300, 100]), torch.tensor([990, 997, 310, 996])
    begin, end, k_rows = (x.to(device) for x in (begin, end, torch.tensor([50, 7, 64, 64])))
    idx, valid = select_tokens(scores, begin, end, 64, k_rows)
    got, ok = select_tokens(scores, begin, end, 64, k_rows, chunk=chunk)
    # rank by rank (on CUDA block_topk's kernel gives the set in position order)
    if device == "cpu":
        assert torch.equal(ok, valid) and torch.equal(got[ok], idx[valid])
    _same_valid_sets(got, ok, idx, valid)
    assert valid.sum(-1)[:, 0].tolist() == [50, 7, 10, 64]  # row 2's range holds 10 positions
    assert got.min() >= 0 and got.max() < 997


def _same_valid_sets(got, ok, idx, valid):
    for row in itertools.product(range(got.shape[0]), range(got.shape[1])):
        assert sorted(got[row][ok[row]].tolist()) == sorted(idx[row][valid[row]].tolist())


@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_selection_through_block_topks_kernel(chunk, monkeypatch):
    """select_tokens as CUDA runs it with blocks (block_topk's kernel; in the interpreter here): each row's own k
    read from a strided column as the engine passes it, the valid positions those of torch.topk, ascending."""
    module = triton_module("block_topk_triton")
    monkeypatch.setattr(selection.block_topk, "ops", lambda device: module)
    gen = torch.Generator().manual_seed(chunk)
    scores = torch.randn(4, 3, 997, generator=gen).to(DEVICE)
    begin, end = torch.tensor([4, 0, 300, 100]), torch.tensor([990, 997, 310, 996])
    table = torch.tensor([[50, 9], [7, 9], [64, 9], [64, 9]])  # [B, S layers]: layer 0's column
    begin, end, table = (x.to(DEVICE) for x in (begin, end, table))
    idx, valid = select_tokens(scores.cpu(), begin.cpu(), end.cpu(), 64, table[:, 0].cpu())
    got, ok = select_tokens(scores, begin, end, 64, table[:, 0], chunk=chunk)
    got, ok = got.cpu(), ok.cpu()
    _same_valid_sets(got, ok, idx, valid)
    assert ok.sum(-1)[:, 0].tolist() == [50, 7, 10, 64]
    for (b, h), kr in zip(itertools.product(range(4), range(3)), [50] * 3 + [7] * 3 + [64] * 6):
        # ascending; past k_r: 0
        assert got[b, h, :kr].diff().gt(0).all() and not got[b, h, kr:].any()


@pytest.mark.parametrize("kernel", [False, True])
def test_selection_with_the_callers_maxima_selects_as_without(kernel, monkeypatch):
    """select_tokens given the blocks' maxima (the sketch kernel's, in the engine) selects what it selects
    computing them: by two_stage_topk, and by block_topk's kernel (in the interpreter here)."""
    if kernel:
        monkeypatch.setattr(
            selection.block_topk, "ops", lambda device: triton_module("block_topk_triton")
        )
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 3, 997, generator=gen).to(DEVICE)
    begin, end = (torch.tensor(x, device=DEVICE) for x in ([4, 0, 300, 100], [990, 997, 310, 996]))
    k_rows = torch.tensor([50, 7, 64, 64], device=DEVICE)
    maxima = block_maxima.block_maxima(scores, begin, end, 8)
    dev = scores if kernel else scores.cpu()
    args = [x.to(dev.device) for x in (begin, end)]
    want = select_tokens(dev, *args, 64, k_rows.to(dev.device), chunk=8)
    got = select_tokens(
        dev, *args, 64, k_rows.to(dev.device), chunk=8, maxima=maxima.to(dev.device)
    )
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    # and they are the maxima it ranks by: all equal, other blocks are taken
    flat = select_tokens(
        dev,
        *args,
        64,
        k_rows.to(dev.device),
        chunk=8,
        maxima=torch.zeros_like(maxima).to(dev.device),
    )
    assert not torch.equal(flat[0], want[0])


@pytest.mark.parametrize("chunk", [0, 13])
def test_selection_in_position_order_keeps_each_slot_valid_with_its_position(chunk):
    """in_order (position_order): the positions torch.topk or the blocks pick, ascending in each row and KV head,
    each slot still valid exactly when its position was among the row's own top k_rows (the ranges and k as
    above: a row with fewer positions than k, one whose own k is 7)."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 3, 997, generator=gen)
    begin, end, k_rows = (
        torch.tensor([4, 0, 300, 100]),
        torch.tensor([990, 997, 310, 996]),
        torch.tensor([50, 7, 64, 64]),
    )
    idx, valid = select_tokens(scores, begin, end, 64, k_rows, chunk=chunk)
    got, ok = select_tokens(scores, begin, end, 64, k_rows, chunk=chunk, in_order=True)
    assert torch.equal(got, idx.sort(dim=-1).values)
    for row in itertools.product(range(4), range(3)):
        assert set(got[row][ok[row]].tolist()) == set(idx[row][valid[row]].tolist())
    assert ok.sum(-1)[:, 0].tolist() == [50, 7, 10, 64]


def test_grouped_attention_ignores_garbage_in_masked_slots():
    """Masked key/value slots (unused window or padding) may hold stale memory, NaN and inf included."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 64), torch.randn(2, 3, 10, 64), torch.randn(2, 3, 10, 64)
    mask = torch.arange(10) < torch.tensor([6, 10])[:, None, None].expand(2, 3, 1)
    clean = grouped_attention(q, k, v, mask=mask)
    k[0, :, 6:], v[0, :, 6:] = float("nan"), float("inf")
    out = grouped_attention(q, k, v, mask=mask)
    assert out.isfinite().all()
    torch.testing.assert_close(out, clean)
    torch.testing.assert_close(out[0], grouped_attention(q[0], k[0, :, :6], v[0, :, :6]))
