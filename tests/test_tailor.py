"""The TailorKV policy and its baselines: exactness where the math is exact (on dummy:tiny, whose 4 layers and GQA
group of 3 run the same code as a real model in a fraction of the time), what needs real attention on the embedded
model, bookkeeping of the quantized cache across the residual boundary, bad configuration."""

from types import SimpleNamespace

import pytest
import torch
from conftest import assert_close_logprobs, forced_logprobs

from tailorkv import Engine
from tailorkv.config import EngineConfig
from tailorkv.engine.sampling import SamplingParams
from tailorkv.errors import ConfigError
from tailorkv.essays import load_essays
from tailorkv.kernels import block_topk, kivi, token_topk
from tailorkv.kernels.attention import causal_attention
from tailorkv.kvcache.offload_store import OffloadState, OffloadStore, SharedPrefix
from tailorkv.kvcache.prompt_rows import PromptRows
from tailorkv.kvcache.quant_store import QuantState, QuantStore, QuantView
from tailorkv.kvcache.tailor_config import TailorConfig

GREEDY = {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompt():
    return load_essays()[:1400]  # ~330 tokens: several 64-token host pages, a partial last one


# exactness needs no real text; a quarter GiB of GPU-tier pools (zeroed at start: the CPU default is 2 GiB)
TINY = {"model": "dummy:tiny", "kv_cache_gib": 0.25}
TINY_TAILOR = {**TINY, "kv_policy": "tailor", "quant_layers": [0]}


@pytest.fixture(scope="module")
def full_tokens(prompt):
    """The embedded model's first 8 greedy tokens with full attention."""
    with Engine(progress=False) as e:
        return e.generate(prompt, sampling_params={**GREEDY, "max_new_tokens": 8})["output_ids"]


@pytest.fixture(scope="module")
def tiny_full_logprobs(prompt):
    with Engine(**TINY, progress=False) as e:
        return forced_logprobs(e, prompt)


@pytest.mark.parametrize(
    "options",
    [
        {"key_sketch": 0},
        {"key_sketch": 1},
    ],
)
def test_tailor_with_covering_budget_equals_full(prompt, tiny_full_logprobs, options):
    with Engine(
        **TINY,
        kv_policy="tailor",
        quant_layers=[],
        sink=8,
        recent=56,
        top_k=4096,
        progress=False,
        **options,
    ) as e:
        assert len(e.policy.s_index) == e.config.num_layers
        assert_close_logprobs(forced_logprobs(e, prompt), tiny_full_logprobs)


def tiny_tailor_logprobs(prompt: str, **options) -> list[float]:
    """forced_logprobs of a fresh tailor engine on dummy:tiny with these options."""
    with Engine(**TINY_TAILOR, progress=False, **options) as e:
        return forced_logprobs(e, prompt)


def test_speculative_fetch_under_a_covering_budget_attends_what_the_real_query_attends(prompt):
    """speculative_fetch picks and fetches S layer l+1's rows with the query predicted at layer l; a covering budget
    makes that the same set the real query picks, so the forced tokens' logprobs equal the usual path's (float32:
    rows fetched in another order are summed in another order)."""
    assert_close_logprobs(
        tiny_tailor_logprobs(prompt, top_k=4096, speculative_fetch=1),
        tiny_tailor_logprobs(prompt, top_k=4096),
    )


def test_two_stage_top_k_selects_what_torch_topk_selects(prompt):
    """topk_chunk=8 (24 blocks of 8 candidates, fewer than the ~330 prompt positions): the same tokens chosen, so
    the same forced logprobs. Scored on exact keys (key_sketch=0): the sketch's quantized scores tie, and a tie at
    the k-th place may be broken either way."""
    assert_close_logprobs(
        tiny_tailor_logprobs(prompt, top_k=24, topk_chunk=8, key_sketch=0),
        tiny_tailor_logprobs(prompt, top_k=24, topk_chunk=0, key_sketch=0),
    )


def test_rows_from_block_topks_kernel_decode_what_torch_topk_rows_decode(prompt, monkeypatch):
    """On CUDA stage 2's blocks go through block_topk's kernel (one program a row, positions in order): the CPU
    engine with that kernel in the interpreter in its place gives the forced logprobs of torch.topk's rows."""
    module = pytest.importorskip("tailorkv.kernels.block_topk_triton")
    opts = dict(progress=False, top_k=24, key_sketch=0, device="cpu")
    with Engine(**TINY_TAILOR, topk_chunk=0, **opts) as e:
        want = forced_logprobs(e, prompt, n=6)
    calls = []

    def positions(*args, **kw):
        calls.append(1)
        return module.top_positions(*args, **kw)

    blocks = SimpleNamespace(top_positions=positions, fits=module.fits)
    monkeypatch.setattr(block_topk, "ops", lambda device: blocks)
    with Engine(**TINY_TAILOR, topk_chunk=8, **opts) as e:  # 6 steps: the interpreter is slow
        got = forced_logprobs(e, prompt, n=6)
    assert_close_logprobs(got, want)
    assert calls


@pytest.mark.parametrize("chunk", [0, 8])
def test_rows_sorted_into_position_order_decode_what_rows_in_rank_order_decode(prompt, chunk):
    """position_order=1 (every step): torch.topk's or the blocks' rows sorted by position before the fetch, the
    same forced logprobs (exact keys, as above; position_order=0: never)."""
    assert_close_logprobs(
        tiny_tailor_logprobs(prompt, top_k=24, topk_chunk=chunk, key_sketch=0, position_order=1),
        tiny_tailor_logprobs(prompt, top_k=24, topk_chunk=chunk, key_sketch=0, position_order=0),
    )


def test_rows_in_position_order_decode_what_rows_in_rank_order_decode(prompt, monkeypatch):
    """With radix_topk=1 on CUDA stage 2's rows come from token_topk's radix select, in position order; otherwise
    from torch.topk, in rank order. The CPU engine with token_topk's reference in the kernel's place gives the same
    forced logprobs (exact keys, as above); on CPU, also on a GPU host: the reference syncs, which no CUDA graph
    may capture."""
    want = tiny_tailor_logprobs(prompt, top_k=24, key_sketch=0, device="cpu")
    calls = []

    def positions(*args):
        calls.append(1)
        return token_topk.top_positions(*args)

    monkeypatch.setattr(token_topk, "ops", lambda device: SimpleNamespace(top_positions=positions))
    assert_close_logprobs(
        tiny_tailor_logprobs(prompt, top_k=24, key_sketch=0, radix_topk=1, device="cpu"), want
    )
    assert calls


@pytest.mark.parametrize("radix_topk,used", [(1, False), (2, True)])
def test_the_radix_select_serves_decode_steps_of_at_most_radix_topk_sequences(
    prompt, monkeypatch, radix_topk, used
):
    """radix_topk=N: the radix select in steps of at most N sequences (on the H100 it wins at batch 1 and loses at
    12), torch.topk in larger ones."""
    calls = []

    def positions(*args):
        calls.append(1)
        return token_topk.top_positions(*args)

    monkeypatch.setattr(token_topk, "ops", lambda device: SimpleNamespace(top_positions=positions))
    with Engine(**TINY_TAILOR, top_k=24, radix_topk=radix_topk, device="cpu") as e:
        ids = e.tokenizer.encode(prompt)
        e.forced([ids[:-8], ids[:-20]], [ids[-8:], ids[-20:-12]])
    assert bool(calls) == used


def test_key_sketch_replaces_the_channel_copy(prompt):
    """With the sketch the host tier keeps token rows only (K and V of every layer: 2 rows, where the faithful path
    adds a channel-major K of each S layer), the GPU tier the sketch pages; a batch scores as each prompt alone
    and every page comes back."""
    prompts = [prompt, prompt[:700]]
    with (
        Engine(**TINY_TAILOR, key_sketch=2, progress=False) as e,
        Engine(**TINY_TAILOR, key_sketch=0, progress=False) as faithful,
    ):
        assert e.policy.offload.k_t is None
        ns, nq = len(e.policy.s_index), len(e.policy.q_index)
        sketch_page, faithful_page = (x.memory.specs["host"].bytes_per_page for x in (e, faithful))
        assert sketch_page * (2 * (ns + nq) + ns) == faithful_page * 2 * (ns + nq)
        assert "sketch" in e.memory.specs and "sketch" not in faithful.memory.specs
        ids = [e.tokenizer.encode(p) for p in prompts]
        alone = [e.forced([x[:-12]], [x[-12:]])[0].output_logprobs for x in ids]
        batch = e.forced([x[:-12] for x in ids], [x[-12:] for x in ids])
        for got, want in zip((r.output_logprobs for r in batch), alone):
            assert_close_logprobs(got, want)
        usage = e.memory.usage()
        assert all(t["free_pages"] == t["total_pages"] for t in usage.values())


@pytest.mark.parametrize("speculative_fetch", [0, 1])
def test_tailor_batch_equals_alone(prompt, speculative_fetch):
    """Rows of a batch each select and fetch their own rows: the forced logprobs of each prompt alone."""
    with Engine(
        **TINY_TAILOR,
        tailor_preset="longbench",
        speculative_fetch=speculative_fetch,
        progress=False,
    ) as e:
        ids = [e.tokenizer.encode(p) for p in (prompt, prompt[:700], prompt[200:1300])]
        prompts, forced = [x[:-12] for x in ids], [x[-12:] for x in ids]
        alone = [e.forced([p], [f])[0].output_logprobs for p, f in zip(prompts, forced)]
        for got, want in zip((r.output_logprobs for r in e.forced(prompts, forced)), alone):
            assert_close_logprobs(got, want)
        assert (
            not e.memory.held
            and e.memory.usage()["host"]["free_pages"] == e.memory.usage()["host"]["total_pages"]
        )


def test_small_budget_changes_little_on_a_short_answer(prompt, full_tokens):
    """A real retrieval budget (much smaller than the prompt) still follows full attention for a while."""
    with Engine(
        kv_policy="tailor", tailor_preset="longbench", top_k=64, progress=False, kv_cache_gib=0.25
    ) as e:
        out = e.generate(prompt, sampling_params={**GREEDY, "max_new_tokens": 8})["output_ids"]
    assert out == full_tokens


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quant_store_tracks_kivi_rules_across_the_residual(bits):
    """Two requests (prompts of 200 and 75 tokens) and a padding row decode 190 tokens together: what attention sees
    stays within half a quantization step of the true K/V, the last `residual` V tokens and the K tail are exact, K
    is quantized in blocks, and the batched paged decode attention equals exact attention over what `dequantized`
    shows, row by row; the padding row (scratch page and slot) disturbs nobody."""
    torch.manual_seed(0)
    h, d, r = 3, 64, 128
    cfg = TailorConfig.from_options("ruler", quant_bits=bits)
    store = QuantStore(1, 16, 2, h, d, cfg, "cpu", torch.float32)
    states = [
        QuantState([5, 2, 7, 0, 1, 3, 4, 6], 1, "cpu", 200),
        QuantState([9, 12, 8, 15, 10], 0, "cpu", 75),
    ]
    starts = [200, 75]
    k, v, q = torch.randn(3, 390, h, d), torch.randn(3, 390, h, d), torch.randn(3, 390, 3 * h, d)
    for b, (st, n) in enumerate(zip(states, starts)):
        store.prefill(0, st, k[b, :n], v[b, :n])
        st.advance(n, r)
    assert [st.kq for st in states] == [128, 0]
    view = QuantView(3, 8, r, "cpu")
    for step in range(190):
        pos = [n + step for n in starts] + [
            step
        ]  # the padding row's tokens are garbage nobody reads
        view.fill(states, r, store.scratch_page, store.scratch_slot)
        store.append(0, view, k[range(3), pos], v[range(3), pos])
        out = store.decode_attention(0, view, q[range(3), pos])
        for b, (st, n) in enumerate(zip(states, pos)):
            kd, vd = store.dequantized(
                0, st, torch.float32
            )  # what attention reads after the append
            torch.testing.assert_close(
                out[b : b + 1], causal_attention(q[b, n : n + 1], kd, vd, n), rtol=1e-4, atol=1e-5
            )
            st.advance(n + 1, r)
            assert kd.shape[0] == n + 1
            assert st.kq == (n + 1) // r * r  # K is quantized in whole blocks of `residual` tokens
            torch.testing.assert_close(vd[-r:], v[b, max(n + 1 - r, 0) : n + 1])
            torch.testing.assert_close(kd[st.kq :], k[b, st.kq : n + 1])
    for b, st in enumerate(states):
        kd, vd = store.dequantized(0, st, torch.float32)
        kb, vb, kq, vq = k[b], v[b], st.kq, max(st.n - r, 0)
        k_step = (kb[:kq].view(-1, 64, h, d).amax(1) - kb[:kq].view(-1, 64, h, d).amin(1)) / (
            2**bits - 1
        )
        assert ((kd[:kq] - kb[:kq]).abs().view(-1, 64, h, d).amax(1) <= k_step / 2 + 2e-3).all()
        v_step = (vb[:vq].amax(-1) - vb[:vq].amin(-1)) / (2**bits - 1)
        assert ((vd[:vq] - vb[:vq]).abs().amax(-1) <= v_step / 2 + 2e-3).all()


@pytest.mark.parametrize("start, n", [(0, 400), (256, 400), (384, 400), (256, 384)])
def test_a_quantized_prompt_is_final_for_a_later_request(start, n):
    """A 460-token prompt's pages hold its tails quantized too, as decode will write them: its decode rewrites
    the same values there (K tail [384, 512) quantized at token 512, V leaving the window), and a second prompt
    that shares the first `start` tokens' pages (and, where its full-precision tails reach back before `start`,
    their exact rows) stores exactly what it stores alone."""
    torch.manual_seed(2)
    h, d, r = 2, 64, 128
    cfg = TailorConfig.from_options("ruler", quant_bits=2)
    store = QuantStore(1, 32, 3, h, d, cfg, "cpu", torch.float32)
    k, v = torch.randn(2, 530, h, d)
    first = QuantState(list(range(9)), 0, "cpu", 460)
    store.prefill(0, first, k[:460], v[:460])
    first.advance(460, r)
    # the prompt's 7 whole K groups and all its V tokens are final
    pages = [
        store.k_packed[:, :7].clone(),
        store.k_scale[:, :7].clone(),
        store.v_packed[:, :460].clone(),
    ]
    view = QuantView(1, 9, r, "cpu")
    for t in range(460, 530):
        view.fill([first], r, store.scratch_page, store.scratch_slot)
        store.append(0, view, k[t : t + 1], v[t : t + 1])
        first.advance(t + 1, r)
    assert first.kq == 512
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            pages, (store.k_packed[:, :7], store.k_scale[:, :7], store.v_packed[:, :460])
        )
    )
    # the second prompt: the first n tokens again (384: a multiple of `residual`, no K tail)
    alone = QuantState(list(range(9, 16)), 1, "cpu", n)
    later = QuantState(list(range(start // 64)) + list(range(16, 23)), 2, "cpu", n)
    store.prefill(0, alone, k[:n], v[:n])
    store.prefill(
        0, later, k[start:n], v[start:n], start, (k[:start], v[:start]) if start else None
    )
    for st in (alone, later):
        st.advance(n, r)
    for a, b in zip(
        store.dequantized(0, alone, torch.float32), store.dequantized(0, later, torch.float32)
    ):
        assert torch.equal(a, b)
    if start > n - r:
        with pytest.raises(ValueError, match="exact rows"):
            store.prefill(
                0, QuantState(list(range(23, 30)), 2, "cpu", n), k[start:n], v[start:n], start
            )


@pytest.mark.parametrize("start", [0, 256])
def test_prefill_rows_stored_together_equal_each_alone(start):
    """Two prompts stored in one set of ops (PromptRows) leave the S layer's host rows, sketch, windows and max|K|
    as storing each alone does, also after a shared prefix (its rows from `prefix`, its pages not written)."""
    torch.manual_seed(3)
    h, d, new = 2, 64, [300, 90]
    k, v = torch.randn(2, sum(new), h, d)
    pre = SharedPrefix(*torch.randn(2, start, h, d), torch.rand(h, d) * 5) if start else None
    stores = [
        OffloadStore(1, 8, 2, 4, h, d, 8, 56, "cpu", torch.float32, sketch_bits=2, sketch_pages=8)
        for _ in range(2)
    ]
    for store in stores:
        for t in store.rows:
            t.zero_()
    pages = [[0, 1, 2], [0, 3]] if start else [[0, 1], [2]]

    def states():
        return [
            OffloadState(p, [i], i, start + n, 8, 56, p) for i, (p, n) in enumerate(zip(pages, new))
        ]

    together, alone = stores
    together.prefill(0, PromptRows.build(states(), new, start, together.window, "cpu"), k, v, pre)
    for i, st in enumerate(states()):
        sl = slice(sum(new[:i]), sum(new[: i + 1]))
        alone.prefill(
            0, PromptRows.build([st], [new[i]], start, alone.window, "cpu"), k[sl], v[sl], pre
        )
    for name in ("win_k", "win_v", "max_abs", "sk_packed", "sk_scale", "sk_zero"):
        assert torch.equal(getattr(together, name), getattr(alone, name)), name
    assert torch.equal(together.rows[0], alone.rows[0]) and together.rows[0][4:].abs().sum() == 0
    assert (together.rows[0][0].abs().sum() == 0) == bool(
        start
    )  # the shared page is not written again


def test_quant_store_append_twice_is_append_once():
    """A captured CUDA graph runs its first step twice (warm-up, then replay): appending a step's tokens twice must
    leave the store as appending them once, across K-tail quantizations and the V ring's turns."""
    torch.manual_seed(1)
    h, d, r = 2, 64, 128
    cfg = TailorConfig.from_options("ruler", quant_bits=2)
    stores = [QuantStore(1, 8, 1, h, d, cfg, "cpu", torch.float32) for _ in range(2)]
    states = [QuantState(list(range(8)), 0, "cpu", 100) for _ in range(2)]
    k, v = torch.randn(400, h, d), torch.randn(400, h, d)
    views = [QuantView(1, 8, r, "cpu") for _ in range(2)]
    for store, st in zip(stores, states):
        store.prefill(0, st, k[:100], v[:100])
        st.advance(100, r)
    for n in range(100, 400):
        for times, (store, st, view) in enumerate(zip(stores, states, views), start=1):
            view.fill([st], r, store.scratch_page, store.scratch_slot)
            for _ in range(times):
                store.append(0, view, k[n : n + 1], v[n : n + 1])
        once, twice = (store.dequantized(0, st, torch.float32) for store, st in zip(stores, states))
        assert all(torch.equal(a, b) for a, b in zip(once, twice)), n
        for st in states:
            st.advance(n + 1, r)


def test_rows_kept_from_the_last_step_decode_what_rows_from_the_host_decode():
    """reuse_rows: a step reads the rows its last step fetched and selects again from the GPU. Three prompts of one
    length run one after another in the same slot, so an earlier request's rows kept at the same positions would
    be read if prefill did not forget them: 12 teacher-forced logprobs each equal those without reuse (float32:
    the same bytes), with some rows (not all) read from the rows kept. On the CPU, also on a GPU host: counting the
    kept rows synchronizes, which a CUDA graph's capture forbids (test_gpu.py runs reuse_rows in graphs)."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 1000, (662,), generator=g).tolist() for _ in range(3)]
    prompts, forced = [x[:650] for x in ids], [x[650:] for x in ids]
    opts = {
        **TINY_TAILOR,
        "progress": False,
        "top_k": 64,
        "max_running_requests": 1,
        "device": "cpu",
    }
    with Engine(**opts) as e:
        want = [r.output_logprobs for r in e.forced(prompts, forced)]
    with Engine(**opts, reuse_rows=24) as e:
        hits, store = [], e.policy.offload
        ops = store.ops

        def gather_rows(rows, pages, idx, *args):
            kept_pos, slots = args[-1][1:]
            kept = (idx[..., None] == kept_pos[slots][:, :, None, :]).any(-1)
            hits.append((kept.sum().item(), kept.numel()))
            return ops.gather_rows(rows, pages, idx, *args)

        store.ops = SimpleNamespace(
            copy_pages=ops.copy_pages, gather_channels=ops.gather_channels, gather_rows=gather_rows
        )
        got = [r.output_logprobs for r in e.forced(prompts, forced)]
    assert got == want
    kept, fetched = map(sum, zip(*hits))
    assert 0 < kept < fetched


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"quant_bits": 3}, "quant_bits"),
        ({"d_s": 65}, "d_s"),
        ({"key_sketch": 3}, "key_sketch"),
        ({"speculative_fetch": 2}, "speculative_fetch"),
        ({"topk_chunk": -1}, "topk_chunk"),
        ({"share_q_pages": 2}, "share_q_pages"),
        ({"position_order": -1}, "position_order must be an integer >= 0"),
        ({"radix_topk": -1}, "radix_topk must be an integer >= 0"),
        ({"reuse_rows": -1}, "reuse_rows must be an integer >= 0"),
        ({"reuse_rows": 1.5}, "reuse_rows must be an integer >= 0"),
        ({"speculative_fetch": 1, "key_sketch": 0}, "needs a key sketch"),
        ({"d_s": 0}, "d_s"),
        ({"top_k": -1}, "top_k"),
        ({"sink": -8}, "sink"),
        ({"tailor_preset": "nope"}, "tailor_preset"),
        ({"quant_layers": [99]}, "quant_layers"),
        ({"quant_layers": "[0]"}, "quant_layers must be a list of layer indices"),
        ({"bogus": 1}, "unknown tailor option"),
    ],
)
def test_bad_tailor_config_fails_at_start(options, needle):
    with pytest.raises(ConfigError, match=needle):
        Engine(kv_policy="tailor", progress=False, **options)


def test_presets_and_overrides():
    t = TailorConfig.from_options("ruler", top_k=100)
    assert (t.sink, t.recent, t.top_k, t.d_s, t.quant_bits) == (64, 64, 100, 12, 2)
    t = TailorConfig.from_options(None)
    assert (t.sink, t.recent, t.top_k, t.d_s, t.quant_bits, t.budget, t.key_sketch) == (
        8,
        56,
        128,
        8,
        1,
        192,
        2,
    )


def test_kivi_value_group_is_head_dim_when_smaller():
    assert kivi.value_group(64, 32, 2) == 32


def test_the_embedded_model_ships_its_plan():
    with Engine(kv_policy="tailor", progress=False, kv_cache_gib=0.05, host_kv_gib=0.05) as e:
        assert e.policy.tc.quant_layers == [0] and not e.policy.plan_missing


@pytest.mark.parametrize("policy", ["offload", "streaming", "quest"])
def test_baselines_with_covering_budget_equal_full(policy, prompt, tiny_full_logprobs):
    """offload is exact by construction; streaming and quest whose budget covers the context are exact too."""
    options = {} if policy == "offload" else {"budget": 4096}
    with Engine(**TINY, kv_policy=policy, progress=False, **options) as e:
        assert_close_logprobs(forced_logprobs(e, prompt), tiny_full_logprobs)


def test_kivi_with_4_bits_follows_full_on_the_first_tokens(prompt, full_tokens):
    with Engine(kv_policy="kivi", quant_bits=4, progress=False, kv_cache_gib=0.25) as e:
        out = e.generate(prompt, sampling_params={**GREEDY, "max_new_tokens": 8})["output_ids"]
    assert out == full_tokens


def test_streaming_and_quest_read_within_budget(prompt):
    for policy in ("streaming", "quest"):
        with Engine(**TINY, kv_policy=policy, budget=64, sink=4, progress=False) as e:
            out = e.generate(prompt, sampling_params={**GREEDY, "max_new_tokens": 4})
            assert out["meta_info"]["completion_tokens"] == 4


# ---- chunked prefill: exact against whole-prompt prefill ---------------------------------------------------------
SMALL = {**TINY, "progress": False, "kv_cache_gib": 0.02, "host_kv_gib": 0.02}
# its chunks read their earlier pages from GPU copies (room for all), the others' over "PCIe"
SKETCH2 = {"kv_policy": "tailor", "quant_layers": [0], "key_sketch": 2, "prefix_gpu_gib": 0.004}
SKETCH0_1BIT = {"kv_policy": "tailor", "quant_layers": [0], "key_sketch": 0, "quant_bits": 1}
# chunk sizes: 37 and 100 align to nothing, 64 to the quantization groups, 256 to the host pages
# (options, chunk size, greedy tokens compared)
CHUNKED = [(SKETCH2, 37, 64), (SKETCH0_1BIT, 100, 16), ({"kv_policy": "kivi"}, 64, 64)]


def record_steps(e: Engine) -> list[list[tuple[int, int, int]]]:
    """(rid, start, new) of each row of every step the engine runs from now on."""
    steps, run = [], e.runner.run
    e.runner.run = lambda rids, start, new, *a: (
        steps.append(list(zip(rids, start, new))) or run(rids, start, new, *a)
    )
    return steps


@pytest.mark.parametrize("options, chunk, tokens", CHUNKED)
def test_chunked_prefill_equals_whole_prompt_prefill(prompt, options, chunk, tokens):
    """Two prompts (~320, ~190 tokens) prefilled in chunks, both chunking in one step and the first decoding in the
    steps that prefill the second, give whole-prompt prefill's greedy tokens and teacher-forced logprobs."""
    prompts, sp = [prompt, prompt[:850]], {**GREEDY, "max_new_tokens": tokens}
    with Engine(**SMALL, **options, enable_prefix_caching=False) as e:
        lens = {i: len(e.tokenize(p, None)) for i, p in enumerate(prompts)}
        e.scheduler.chunk_tokens = 4096
        want = [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)]
        e.scheduler.chunk_tokens = chunk
        steps, reads = record_steps(e), []
        read_prefix = e.policy.offload.read_prefix
        e.policy.offload.read_prefix = lambda *a, **kw: reads.append(a[1]) or read_prefix(*a, **kw)
        assert [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)] == want
        copies = "prefix_gpu_gib" in options
        assert reads and all((r.at is not None, not r.host_runs) == (copies, copies) for r in reads)
        # a prompt's pages took free slots in order: its later chunks read their copies in place
        assert any(r.run is not None for r in reads) == copies
        prefill = [[(r, n) for r, s, n in step if s < lens[r - len(prompts)]] for step in steps]
        assert max(n for rows in prefill for _, n in rows) <= chunk
        assert any(len(rows) == 2 for rows in prefill)  # both chunking in one step
        assert any(rows and len(rows) < len(step) for rows, step in zip(prefill, steps))
        # the exact check: the same prompts' last 8 tokens teacher-forced, whole against chunked
        ids = [e.tokenizer.encode(p) for p in prompts]
        logprobs = []
        for size in (4096, chunk):
            e.scheduler.chunk_tokens = size
            reqs = e.forced([x[:-8] for x in ids], [x[-8:] for x in ids])
            logprobs.append([r.output_logprobs for r in reqs])
        for got, want in zip(logprobs[1], logprobs[0]):
            assert_close_logprobs(got, want)
        assert not e.memory.held and not e.policy.s_state and not e.policy.q_state


class EagerGraphs:
    """DecodeGraphs' contract run eagerly (CPU has no CUDA graphs): the policy's graph-shaped step, every shape as
    if captured before; `capture` (may this step capture a shape) recorded per call."""

    def __init__(self, e: Engine):
        self.model, self.policy, self.rows, self.capture = e.model, e.policy, [], []

    def run(self, ids, batch, capture=True):
        prepared = self.policy.prepare_for_graph(batch, batch.size)
        if prepared is None:
            return None
        self.rows.append(batch.size)
        self.capture.append(capture)
        return self.model(ids, batch.positions, self.policy, prepared[0]), prepared[0]


@pytest.mark.parametrize("options", [SKETCH2, {"kv_policy": "full"}])
def test_decode_rows_of_a_mixed_step_replay_the_graph(prompt, options):
    """With CUDA graphs, a step of decode rows and prompt chunks replays the decode rows' graph (where their shape
    has one: such a step never captures) and runs the chunks in a second, eager pass: greedy tokens equal one eager
    pass's."""
    prompts, sp = [prompt, prompt[:850]], {**GREEDY, "max_new_tokens": 24}
    with Engine(**SMALL, **options, enable_prefix_caching=False) as e:
        e.scheduler.chunk_tokens = 37
        want = [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)]
        steps, e.runner.graphs = record_steps(e), EagerGraphs(e)
        assert [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)] == want
        decoding = [s for s in steps if any(n == 1 for _, _, n in s)]
        assert any(
            len(s) == 2 and s[0][2] != s[1][2] for s in decoding
        )  # steps of a decode row and a chunk
        assert len(e.runner.graphs.rows) == len(decoding)  # each replayed its decode rows
        # only the steps without chunks may capture
        assert e.runner.graphs.capture == [all(n == 1 for *_, n in s) for s in decoding]
        assert not e.memory.held


def prefilled_state(e: Engine, ids: list[int], chunk: int) -> dict[str, torch.Tensor]:
    """Prefill `ids` in chunks of `chunk` tokens; what the request stored, per row layer / layer (first dim)."""
    e.scheduler.chunk_tokens = chunk
    req = e.add_request(ids, SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
    while req.seq.prefilling:
        e.step()
    p, st, n = e.policy, e.policy.s_state[req.rid], len(ids)
    o, q = p.offload, p.quant
    state = {"rows": torch.stack([r[st.host_pages_cpu] for r in o.rows])}
    if p.s_index:
        state |= {x: getattr(o, x)[:, st.slot] for x in ("max_abs", "win_k", "win_v")}
        if o.sketch_bits:
            state |= {x: getattr(o, x)[:, st.sketch_pages_cpu] for x in ("sk_packed", "sk_scale")}
    if p.q_index:
        qs = p.q_state[req.rid]
        pages, slots = qs.pages[: n // 64], q._token_slots(qs, 0, n)
        kq, vq = n - n % p.tc.residual, n - p.tc.residual
        state |= {x: getattr(q, x)[:, pages] for x in ("k_packed", "k_scale", "k_zero")}
        state |= {x: getattr(q, x)[:, slots] for x in ("v_packed", "v_scale", "v_zero")}
        state |= {
            "k_tail": q.k_tail[:, qs.slot, : n - kq],
            "v_win": q.v_win[:, qs.slot, q._ring(vq, n)],
        }
    state = {x: t.clone() for x, t in state.items()}
    e.abort(req.rid)
    return state


@pytest.mark.parametrize(
    "options, chunks",
    [(SKETCH2, (100, 256)), (SKETCH0_1BIT, (37, 64)), ({"kv_policy": "kivi"}, (37,))],
)
def test_chunked_prefill_stores_what_whole_prompt_prefill_stores(prompt, options, chunks):
    """Host rows, max|K|, windows, sketch and quantized pages of a prompt prefilled in chunks equal whole-prompt
    prefill's: bit-exact in the first layer (the same ops on the same inputs), within 1e-5 in float32 further up
    (a chunk attends to its prefix in two parts merged by log-sum-exp), where a quantization code may flip for a
    value on a rounding boundary (at most 1 in 200; float16 scales and zero-points within float16's tolerance)."""
    with Engine(**SMALL, **options, enable_prefix_caching=False) as e:
        ids = e.tokenize(prompt, None)
        whole = prefilled_state(e, ids, 4096)
        chunked = [prefilled_state(e, ids, chunk) for chunk in chunks]
        first = len(e.policy.s_index)  # layer 0's row layer (kivi: 0)
    for state in chunked:
        for name, a in whole.items():
            b = state[name]
            exact = first if name == "rows" else 0 if name[0] in "kv" else None  # layer 0: Q
            if exact is not None:
                assert torch.equal(a[exact], b[exact]), name
            if a.dtype == torch.int32:
                assert (a != b).float().mean() <= 0.005, name
            else:
                tol = {"rtol": 0, "atol": 1e-5} if a.dtype == torch.float32 else {}
                torch.testing.assert_close(a, b, **tol, msg=name)


def test_requests_past_the_host_tier_keep_their_rows_on_the_gpu_and_decode_the_same():
    """gpu_rows_gib: with 4 pinned host pages and 8 resident ones (rows in the GPU tier alone), three prompts of 3
    pages run at once, the later two on resident pages, prefilled in 100-token chunks (a partly computed page is read
    back from its copy), then again from the prefix cache: 12 teacher-forced steps each give the logprobs of a host
    tier that holds them all (the same rows, read from elsewhere). Nothing is written to the host tier for resident
    pages (its scratch page, which their reads index, keeps what it held)."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 1000, (662,), generator=g).tolist() for _ in range(3)]
    prompts, forced = [x[:650] for x in ids], [x[650:] for x in ids]
    base = {
        **TINY_TAILOR,
        "key_sketch": 2,
        "chunked_prefill_size": 100,
        "progress": False,
        "kv_cache_gib": 0.05,
    }
    out, item = (
        {},
        2 if torch.cuda.is_available() else 4,
    )  # bfloat16 on the GPU: pages of half the bytes
    resident = {"host_kv_gib": 0.0005 * item, "gpu_rows_gib": 0.001 * item}
    for name, opts in (("host", {"host_kv_gib": 0.05}), ("resident", resident)):
        with Engine(**base, **opts) as e:
            held, add = [], e.policy.add_request
            e.policy.add_request = lambda rid, pages, *a: (
                held.append(pages["host"]) or add(rid, pages, *a)
            )
            offload = e.policy.offload
            scratch = [rows[-1] for rows in offload.rows] if name == "resident" else []
            for page in scratch:  # the host tier's last page: its scratch page
                page.fill_(7)
            out[name] = [[r.output_logprobs for r in e.forced(prompts, forced)] for _ in range(2)]
            copies = offload.copies
            if name == "resident":
                assert (copies.pinned, copies.resident) == (4, 8)
                assert sorted(p for h in held[:3] for p in h) == list(range(9))
                assert all((page == 7).all() for page in scratch)
                # what /metrics reports as the host tier: the 4 pinned pages, not the 8 resident ones
                host = e.memory.usage()["host"]
                assert host["total_bytes"] == 4 * e.memory.specs["host"].bytes_per_page
            else:
                assert copies.resident == 0
    for got, want in zip(sum(out["resident"], []), sum(out["host"], [])):
        assert_close_logprobs(got, want)


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"gpu_rows_gib": -1}, "gpu_rows_gib must be a number of GiB >= 0"),
        ({"gpu_rows_gib": "8"}, "gpu_rows_gib must be a number of GiB >= 0"),
        ({"gpu_rows_gib": 8, "key_sketch": 0}, "gpu_rows_gib needs a key sketch"),
    ],
)
def test_bad_gpu_rows_are_config_errors(options, needle):
    with pytest.raises(ConfigError, match=needle):
        EngineConfig.from_kwargs(kv_policy="tailor", **options)
