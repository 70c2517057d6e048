"""One GEMM for q, k, v and one for gate, up: the loaders' HF-named weights concatenated at load (each tensor-parallel
rank its own slices), split back by hf_state_dict; the fused layer computes what the separate projections did.
Greedy and sampled tokens before and after fusing: test_golden (recorded before it, unchanged) and test_tp."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tailorkv.models.dummy import load_dummy
from tailorkv.models.llama import hf_state_dict
from tailorkv.models.loader import load_model
from tailorkv.models.sharding import shard

CPU = torch.device("cpu")


def test_hf_state_dict_gives_back_the_loaders_weights():
    hf = dict(load_dummy("tiny", CPU).tensors)
    model, _ = load_model("dummy:tiny", CPU, torch.float32, progress=False)
    back = hf_state_dict(model)
    assert "model.layers.3.self_attn.qkv_proj.weight" in model.state_dict()
    assert set(back) == set(hf) | {"lm_head.weight"}  # tied to the embedding
    for name, w in hf.items():
        assert torch.equal(back[name], w), name


def test_a_rank_concatenates_its_own_slices():
    cfg = load_dummy("tiny-kv4", CPU).config
    hf = dict(load_dummy("tiny-kv4", CPU).tensors)
    for rank in range(2):
        model, _ = load_model(
            "dummy:tiny-kv4",
            CPU,
            torch.float32,
            progress=False,
            tp=SimpleNamespace(rank=rank, size=2),
        )
        state = model.state_dict()
        for fused, parts in (
            ("self_attn.qkv_proj", ("q", "k", "v")),
            ("mlp.gate_up_proj", ("gate", "up")),
        ):
            prefix = f"model.layers.1.{fused.split('.')[0]}"
            names = [f"{prefix}.{p}_proj.weight" for p in parts]
            want = torch.cat([shard(n, hf[n], cfg, rank, 2) for n in names])
            assert torch.equal(state[f"model.layers.1.{fused}.weight"], want)


def test_fused_layer_computes_the_separate_projections():
    model, _ = load_model("dummy:tiny", CPU, torch.float32, progress=False)
    w = hf_state_dict(model)
    layer, rot = model.layers[2], model.rotary
    x, pos = torch.randn(7, model.config.hidden_size), torch.arange(5, 12)
    q, k, v = layer.self_attn.qkv(x, pos, rot)
    a = layer.self_attn
    p = "model.layers.2.self_attn"
    rope = lambda t, h: rot.apply(t.view(7, h, a.head_dim), pos)  # noqa: E731
    torch.testing.assert_close(q, rope(F.linear(x, w[f"{p}.q_proj.weight"]), a.num_heads))
    torch.testing.assert_close(q, a.project_q(x, pos, rot))
    torch.testing.assert_close(k, rope(F.linear(x, w[f"{p}.k_proj.weight"]), a.num_kv_heads))
    torch.testing.assert_close(v, F.linear(x, w[f"{p}.v_proj.weight"]).view(7, -1, a.head_dim))
    m = "model.layers.2.mlp"
    gate, up = (F.linear(x, w[f"{m}.{n}_proj.weight"]) for n in ("gate", "up"))
    expect = F.linear(F.silu(gate) * up, w[f"{m}.down_proj.weight"])
    torch.testing.assert_close(layer.mlp(x), expect)
