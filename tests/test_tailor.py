"""The TailorKV policy and its baselines on the embedded model: exactness where the math is exact, bookkeeping of
the quantized cache across the residual boundary, bad configuration."""
import pytest
import torch

from tailorkv import Engine
from tailorkv.errors import ConfigError
from tailorkv.kernels import kivi
from tailorkv.kernels.attention import causal_attention
from tailorkv.kvcache.quant_store import QuantState, QuantStore
from tailorkv.kvcache.tailor_config import TailorConfig
from tailorkv.essays import load_essays

GREEDY = {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompt():
    return load_essays()[:1400]  # ~330 tokens: several 64-token host pages, a partial last one


@pytest.fixture(scope="module")
def full_tokens(prompt):
    with Engine(progress=False) as e:
        return e.generate(prompt, sampling_params=GREEDY)["output_ids"]


@pytest.mark.parametrize("key_sketch", [0, 1])
def test_tailor_with_covering_budget_equals_full(prompt, full_tokens, key_sketch):
    with Engine(kv_policy="tailor", quant_layers=[], sink=8, recent=56, top_k=4096, key_sketch=key_sketch,
                progress=False) as e:
        assert len(e.policy.s_index) == e.config.num_layers
        assert e.generate(prompt, sampling_params=GREEDY)["output_ids"] == full_tokens


def test_key_sketch_replaces_the_channel_copy(prompt):
    """With the sketch the host tier keeps token rows only (K and V of every layer: 2 rows, where the faithful path
    adds a channel-major K of each S layer), the GPU tier the sketch pages; a batch decodes as each prompt alone
    and every page comes back."""
    prompts, sp = [prompt, prompt[:700]], {**GREEDY, "max_new_tokens": 12}
    with Engine(kv_policy="tailor", key_sketch=2, progress=False) as e, \
            Engine(kv_policy="tailor", key_sketch=0, progress=False) as faithful:
        assert e.policy.offload.k_t is None
        ns, nq = len(e.policy.s_index), len(e.policy.q_index)
        sketch_page, faithful_page = (x.memory.specs["host"].bytes_per_page for x in (e, faithful))
        assert sketch_page * (2 * (ns + nq) + ns) == faithful_page * 2 * (ns + nq)
        assert "sketch" in e.memory.specs and "sketch" not in faithful.memory.specs
        alone = [e.generate(p, sampling_params=sp)["output_ids"] for p in prompts]
        assert [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)] == alone
        usage = e.memory.usage()
        assert all(t["free_pages"] == t["total_pages"] for t in usage.values())


def test_tailor_batch_equals_alone(prompt):
    prompts = [prompt, prompt[:700], prompt[200:1300]]
    sp = {**GREEDY, "max_new_tokens": 12}
    with Engine(kv_policy="tailor", tailor_preset="longbench", progress=False) as e:
        assert e.policy.tc.quant_layers == [0]  # the embedded model's shipped plan
        alone = [e.generate(p, sampling_params=sp)["output_ids"] for p in prompts]
        assert [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)] == alone
        assert not e.memory.held and e.memory.usage()["host"]["free_pages"] == e.memory.usage()["host"]["total_pages"]


def test_small_budget_changes_little_on_a_short_answer(prompt, full_tokens):
    """A real retrieval budget (much smaller than the prompt) still follows full attention for a while."""
    with Engine(kv_policy="tailor", tailor_preset="longbench", top_k=64, progress=False) as e:
        out = e.generate(prompt, sampling_params=GREEDY)["output_ids"]
    assert out[:8] == full_tokens[:8]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quant_store_tracks_kivi_rules_across_the_residual(bits):
    """Prefill 200 tokens, then decode 190 one at a time: what attention sees stays within half a quantization
    step of the true K/V, the last `residual` V tokens and the K tail are exact, K is quantized in blocks, and the
    fused decode attention (packed pages + residual) equals exact attention over what `dequantized` shows."""
    torch.manual_seed(0)
    h, d, r = 3, 64, 128
    cfg = TailorConfig.from_options("ruler", quant_bits=bits)
    store = QuantStore(1, 8, 1, h, d, cfg, "cpu", torch.float32)
    st = QuantState(torch.tensor([5, 2, 7, 0, 1, 3, 4, 6]), 0)
    k, v, q = torch.randn(390, h, d), torch.randn(390, h, d), torch.randn(390, 3 * h, d)
    store.prefill(0, st, k[:200], v[:200])
    st.advance(200, r)
    assert st.kq == 128
    for n in range(200, 390):
        store.append(0, st, k[n:n + 1], v[n:n + 1])
        kd, vd = store.dequantized(0, st, torch.float32)  # what attention reads after the append
        torch.testing.assert_close(store.decode_attention(0, st, q[n:n + 1]), causal_attention(q[n:n + 1], kd, vd, n),
                                   rtol=1e-4, atol=1e-5)
        st.advance(n + 1, r)
        assert kd.shape[0] == n + 1
        assert st.kq == (n + 1) // r * r  # K is quantized in whole blocks of `residual` tokens
        torch.testing.assert_close(vd[-r:], v[n + 1 - r:n + 1])
        torch.testing.assert_close(kd[st.kq:], k[st.kq:n + 1])
    k_step = (k[:st.kq].view(-1, 64, h, d).amax(1) - k[:st.kq].view(-1, 64, h, d).amin(1)) / (2 ** bits - 1)
    k_err = (kd[:st.kq] - k[:st.kq]).abs().view(-1, 64, h, d).amax(1)
    assert (k_err <= k_step / 2 + 2e-3).all()
    vq = n + 1 - r
    v_step = (v[:vq].amax(-1) - v[:vq].amin(-1)) / (2 ** bits - 1)
    assert ((vd[:vq] - v[:vq]).abs().amax(-1) <= v_step / 2 + 2e-3).all()


@pytest.mark.parametrize("options,needle", [
    ({"quant_bits": 3}, "quant_bits"),
    ({"d_s": 65}, "d_s"),
    ({"key_sketch": 3}, "key_sketch"),
    ({"d_s": 0}, "d_s"),
    ({"top_k": -1}, "top_k"),
    ({"sink": -8}, "sink"),
    ({"tailor_preset": "nope"}, "tailor_preset"),
    ({"quant_layers": [99]}, "quant_layers"),
    ({"bogus": 1}, "unknown tailor option"),
])
def test_bad_tailor_config_fails_at_start(options, needle):
    with pytest.raises(ConfigError, match=needle):
        Engine(kv_policy="tailor", progress=False, **options)


def test_presets_and_overrides():
    t = TailorConfig.from_options("ruler", top_k=100)
    assert (t.sink, t.recent, t.top_k, t.d_s, t.quant_bits) == (64, 64, 100, 12, 2)
    t = TailorConfig.from_options(None)
    assert (t.sink, t.recent, t.top_k, t.d_s, t.quant_bits, t.budget, t.key_sketch) == (8, 56, 128, 8, 1, 192, 2)


def test_kivi_value_group_is_head_dim_when_smaller():
    assert kivi.value_group(64, 32, 2) == 32


@pytest.mark.parametrize("policy", ["offload", "streaming", "quest", "kivi"])
def test_baselines_with_covering_budget_equal_full(policy, prompt, full_tokens):
    """offload is exact by construction; streaming and quest whose budget covers the context are exact too;
    kivi with 4 bits follows full on the first tokens."""
    options = {"kivi": {"quant_bits": 4}, "offload": {}}.get(policy, {"budget": 4096})
    with Engine(kv_policy=policy, progress=False, **options) as e:
        out = e.generate(prompt, sampling_params={**GREEDY, "max_new_tokens": 16})["output_ids"]
    n = 8 if policy == "kivi" else 16
    assert out[:n] == full_tokens[:n]


def test_streaming_and_quest_read_within_budget(prompt):
    for policy in ("streaming", "quest"):
        with Engine(kv_policy=policy, budget=64, sink=4, progress=False) as e:
            out = e.generate(prompt, sampling_params={**GREEDY, "max_new_tokens": 4})
            assert out["meta_info"]["completion_tokens"] == 4
