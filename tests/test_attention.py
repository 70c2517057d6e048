"""The prefill attentions (causal_attention, attention_lse, shared_prefix_attention, PagedPrefill: FlashInfer on
CUDA, torch on CPU) against a brute-force softmax over an explicit causal mask, the merge of partial results, and
decode rows sharing leading pages (SharedPrefixDecode, cascade attention)."""

import pytest
import torch

from tailorkv.kernels import flashinfer_decode
from tailorkv.kernels.attention import (
    PagedPrefill,
    SharedPrefixDecode,
    attention_lse,
    causal_attention,
    merge_attention_states,
    shared_prefix_attention,
)
from tailorkv.kernels.flashinfer_decode import available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force(q, k, v, q_start, lse=False):
    """Float64; q_start None: every query sees every key."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, dim=1) for x in (k, v))
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * q.shape[-1] ** -0.5
    if q_start is not None:
        seen = torch.arange(k.shape[0]) <= torch.arange(q_start, q_start + q.shape[0])[:, None]
        scores = scores.masked_fill(~seen.to(q.device), float("-inf"))
    out = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).float()
    return (out, scores.logsumexp(-1).T.float()) if lse else out


def rand(*shape, device, seed):
    torch.manual_seed(seed)
    return torch.randn(
        *shape, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32
    )


def tolerance(x):
    return dict(rtol=1e-2, atol=1e-2) if x.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,q_start", [(37, 0), (37, 100), (1, 130), (64, 1)])
def test_causal_attention_from_any_position(device, n, q_start):
    """GQA group 3, head_dim 64; a chunk after q_start earlier tokens sees them all and its own past only."""
    q = rand(n, 6, 64, device=device, seed=n + q_start)
    k, v = (
        rand(q_start + n, 2, 64, device=device, seed=1),
        rand(q_start + n, 2, 64, device=device, seed=2),
    )
    got = causal_attention(q, k, v, q_start)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), brute_force(q, k, v, q_start), **tolerance(q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,length", [(37, 300), (5, 5), (130, 1000)])
def test_attention_lse(device, causal, n, length, monkeypatch):
    """Output and natural log-sum-exp; the reference in several query chunks gives the same."""
    q, k, v = (
        rand(n, 6, 64, device=device, seed=n),
        rand(length, 2, 64, device=device, seed=1),
        rand(length, 2, 64, device=device, seed=2),
    )
    want, want_lse = brute_force(q, k, v, length - n if causal else None, lse=True)
    monkeypatch.setattr(
        "tailorkv.kernels.attention.SCORE_CHUNK", 6 * length * 16
    )  # 16 queries a chunk
    out, lse = attention_lse(q, k, v, causal=causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (n, 6)
    torch.testing.assert_close(out.float(), want, **tolerance(q))
    torch.testing.assert_close(lse, want_lse, **tolerance(q))


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_attention_equals_each_row_over_the_whole_prompt(device):
    """Three rows of 1, 70 and 9 new tokens after one 300-token prefix; GQA group 3, head_dim 64. The prefix's k
    and v are strided views of token rows [tokens, heads, k|v], as tailor's host pages are read back."""
    prefix, cu = 300, [0, 1, 71, 80]
    q = rand(80, 6, 64, device=device, seed=3)
    k, v = rand(80, 2, 64, device=device, seed=4), rand(80, 2, 64, device=device, seed=5)
    rows = rand(prefix, 2, 128, device=device, seed=6)
    pk, pv = rows[..., :64], rows[..., 64:]
    got = shared_prefix_attention(q, k, v, cu, pk, pv)
    assert got.dtype == q.dtype
    for a, b in zip(cu[:-1], cu[1:]):
        want = brute_force(q[a:b], torch.cat([pk, k[a:b]]), torch.cat([pv, v[a:b]]), prefix)
        torch.testing.assert_close(got[a:b].float(), want, **tolerance(q))


@pytest.mark.parametrize("device", DEVICES)
def test_a_turn_over_a_long_prefix(device):
    """A doc chat turn: 80 queries after an 8,192-token prefix, GQA 4, head_dim 128 (on the GPU FA2's plan splits
    the prefix's keys across the SMs and merges the parts)."""
    prefix, cu = 8192, [0, 80]
    q = rand(80, 32, 128, device=device, seed=3)
    k, v = rand(80, 8, 128, device=device, seed=4), rand(80, 8, 128, device=device, seed=5)
    pk, pv = rand(prefix, 8, 256, device=device, seed=6).split(128, -1)
    got = shared_prefix_attention(q, k, v, cu, pk, pv)
    want = brute_force(q, torch.cat([pk, k]), torch.cat([pv, v]), prefix)
    torch.testing.assert_close(got.float(), want, **tolerance(q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", [300, 0])
def test_shared_prefix_attention_with_own_keys_before_the_queries(device, prefix):
    """Rows whose own keys begin before their queries (a cached partial block: 0, 200 and 37 such keys before 1, 70
    and 9 queries), after a shared prefix or none; keys and values as tailor passes them, views of [K | V] rows."""
    cu, cu_k = [0, 1, 71, 80], [0, 1, 271, 317]
    q = rand(80, 6, 64, device=device, seed=3)
    k, v = rand(317, 2, 128, device=device, seed=4).split(64, -1)
    pk, pv = rand(prefix, 2, 128, device=device, seed=6).split(64, -1)
    got = shared_prefix_attention(q, k, v, cu, pk, pv, cu_k=cu_k)
    for a, b, c, d in zip(cu[:-1], cu[1:], cu_k[:-1], cu_k[1:]):
        want = brute_force(
            q[a:b], torch.cat([pk, k[c:d]]), torch.cat([pv, v[c:d]]), prefix + d - c - (b - a)
        )
        torch.testing.assert_close(got[a:b].float(), want, **tolerance(q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("long", [False, True])
def test_paged_prefill_equals_causal_attention_over_each_rows_pages(device, hq, hkv, d, long):
    """Prompt rows attending in place to their pages (full's chunked prefill): a first chunk, a chunk after 300
    cached tokens and one token after 17; pages out of order, lengths off the page. long (CUDA only: the float64
    reference would take seconds on CPU): a first chunk of 2,200 tokens, which FlashInfer's default backend takes
    (FA3 on Hopper), where the short rows go to FA2."""
    if long and device == "cpu":
        pytest.skip("the long case checks the backend FlashInfer runs on a GPU")
    paged = PagedPrefill
    if fast := available(torch.device(device), torch.bfloat16, d):
        from tailorkv.kernels.flashinfer_prefill import PagedPrefill as paged
    k_pages, v_pages = (rand(256, 16, hkv, d, device=device, seed=s) for s in (8, 9))
    lengths, new = [2200 if long else 70, 337, 18], [2200 if long else 70, 37, 1]
    torch.manual_seed(10)
    pages = [torch.randperm(256, device=device)[: -(-n // 16)] for n in lengths]
    q = rand(sum(new), hq, d, device=device, seed=11)
    attn = paged(torch.device(device), hq, hkv, d)
    attn.plan(pages, lengths, new, 16, q.dtype)
    # FA3's work items, query heads x tiles of 128: 640 and at most 96, either side of 2 CTAs an SM on any GPU here
    if fast and (hq == 32 or not long):
        assert attn.wrapper is attn.wrappers["auto" if long else "fa2"]
        # the chunks the engine compiles at start, one for each backend
        for n, backend in zip(attn.warm_up_sizes(), ("fa2", "auto")):
            zero = torch.zeros(-(-n // 16), dtype=torch.long, device=device)
            attn.plan([zero], [n], [n], 16, q.dtype)
            assert attn.wrapper is attn.wrappers[backend]
        attn.plan(pages, lengths, new, 16, q.dtype)
    out, a = attn.run(q, k_pages, v_pages), 0
    for p, n, m in zip(pages, lengths, new):
        keys, values = (x[p].flatten(0, 1)[:n] for x in (k_pages, v_pages))
        torch.testing.assert_close(
            out[a : a + m].float(), brute_force(q[a : a + m], keys, values, n - m), **tolerance(q)
        )
        a += m


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlashInfer's page-locked plans are a GPU's"
)
def test_paged_prefill_plans_chunks_while_the_stream_lags():
    """A long prompt's chunks, each planned and launched while the chunks before still wait in the stream (a busy
    GPU, no synchronisation between them, as full's chunked prefill runs): each chunk reads its own plan's pages.
    A plan writes the wrapper's page-locked buffer for a copy the stream runs later; without waiting for the last
    plan's copy, the second chunk's plan overwrote the first's before it was copied (an H100 faulted)."""
    from tailorkv.kernels.flashinfer_prefill import PagedPrefill as paged

    hq, hkv, d, chunk = 32, 8, 128, 2048
    k_pages, v_pages = (rand(512, 16, hkv, d, device="cuda", seed=s) for s in (8, 9))
    torch.manual_seed(12)
    pages = torch.randperm(512, device="cuda")
    attn = paged(torch.device("cuda"), hq, hkv, d)
    busy = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):  # ~0.5 s of work queued ahead of the chunks
        busy = busy @ busy / 100
    qs, outs = [], []
    for c in range(1, 5):
        qs.append(rand(chunk, hq, d, device="cuda", seed=20 + c))
        attn.plan([pages[: c * chunk // 16]], [c * chunk], [chunk], 16, qs[-1].dtype)
        outs.append(attn.run(qs[-1], k_pages, v_pages))
    for c, (q, out) in enumerate(zip(qs, outs), 1):
        keys, values = (x[pages[: c * chunk // 16]].flatten(0, 1) for x in (k_pages, v_pages))
        torch.testing.assert_close(
            out.float(), brute_force(q, keys, values, (c - 1) * chunk), **tolerance(q)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("one_group", [False, True])
def test_decode_rows_sharing_leading_pages_equal_attention_over_each_rows_pages(
    device, hq, hkv, d, one_group
):
    """Two groups (rows 0, 2, 3 share 5 pages; rows 1, 4 share 3) and a row sharing nothing, or every row sharing
    the 5 pages (doc chat: no rows gathered); own parts of 1 token to 40 (off the page), pages out of order: each row
    equals plain attention over all its tokens."""
    decode = SharedPrefixDecode
    if available(torch.device(device), torch.bfloat16, d):
        decode = flashinfer_decode.SharedPrefixDecode
    k_pages, v_pages = (rand(64, 16, hkv, d, device=device, seed=s) for s in (8, 9))
    torch.manual_seed(12)
    order = torch.randperm(64, device=device)
    shared = [order[:5], order[5:8]]
    own, lengths = order[8:20].split([3, 2, 1, 2, 3, 1]), [40, 17, 1, 30, 33, 5]
    groups = [([0, 2, 3], shared[0]), ([1, 4], shared[1])]
    if one_group:
        groups = [(list(range(6)), shared[0])]
    q = rand(6, hq, d, device=device, seed=13)
    attn = decode(torch.device(device), hq, hkv, d, 16, q.dtype)
    attn.plan(groups, list(own), lengths)
    out = attn.run(q, k_pages, v_pages)
    first = {i: pages for rows, pages in groups for i in rows}
    for i, (p, n) in enumerate(zip(own, lengths)):
        before = first.get(i, p[:0])
        keys, values = (
            torch.cat([x[before].flatten(0, 1), x[p].flatten(0, 1)[:n]]) for x in (k_pages, v_pages)
        )
        torch.testing.assert_close(
            out[i : i + 1].float(), brute_force(q[i : i + 1], keys, values, None), **tolerance(q)
        )


def test_causal_attention_rejects_keys_that_do_not_end_at_the_chunk():
    q, k = torch.randn(4, 2, 64), torch.randn(9, 2, 64)
    with pytest.raises(ValueError, match="need 8 keys, got 9"):
        causal_attention(q, k, k, 4)


def test_merge_attention_states():
    q, k, v = (
        rand(4, 9, 64, device="cpu", seed=1),
        rand(150, 3, 64, device="cpu", seed=2),
        rand(150, 3, 64, device="cpu", seed=3),
    )
    whole = brute_force(q, k, v, None, lse=True)
    a, b = (
        brute_force(q, k[:40], v[:40], None, lse=True),
        brute_force(q, k[40:], v[40:], None, lse=True),
    )
    for got in (merge_attention_states(*a, *b), merge_attention_states(*b, *a)):
        torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    torch.testing.assert_close(merge_attention_states(*a, *empty), a, atol=1e-6, rtol=1e-6)
    out, lse = merge_attention_states(*empty, *empty)
    assert (out == 0).all() and (lse == float("-inf")).all()
