"""The Llama family beyond the embedded model: llama3 RoPE scaling, Qwen2 QKV bias, untied heads, dummy weights;
logits checked against HF transformers on tiny random models written as HF directories."""

import pytest
import torch

from tailorkv import Engine
from tailorkv.models.rope import inv_frequencies

transformers = pytest.importorskip("transformers")


def llama3_scaling(original: int) -> dict:
    """A fresh dict each time: transformers' config classes modify the dict they are given."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }


def tiny_hf_dir(tmp_path, cls_name: str, **extra):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(
        vocab_size=49152,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(tmp_path)
    with Engine(progress=False) as e:  # any byte-level tokenizer with a 49152 vocab will do
        e.tokenizer.save_pretrained(str(tmp_path))
    return model


@pytest.mark.parametrize(
    "cls_name,extra",
    [
        ("LlamaForCausalLM", {"rope_scaling": llama3_scaling(64)}),
        ("Qwen2ForCausalLM", {}),
        ("MistralForCausalLM", {"sliding_window": None}),
    ],
)
def test_logits_match_transformers(tmp_path, cls_name, extra):
    hf = tiny_hf_dir(tmp_path, cls_name, **extra)
    ids = list(range(100, 400, 3))
    with Engine(model=str(tmp_path), progress=False) as ours:
        if cls_name == "Qwen2ForCausalLM":
            assert ours.config.qkv_bias
        got = ours.next_token_logits(ids)
    want = hf(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_llama3_inv_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=llama3_scaling(8192),
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = inv_frequencies(128, 500000.0, llama3_scaling(8192))
    torch.testing.assert_close(got, want.float())


def test_dummy_weights_are_seeded_and_run():
    with (
        Engine(model="dummy:tiny", progress=False) as a,
        Engine(model="dummy:tiny", progress=False) as b,
    ):
        ids = [5, 6, 7, 8]
        assert torch.equal(a.next_token_logits(ids), b.next_token_logits(ids))
        out = a.generate(
            input_ids=ids,
            sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert len(out["output_ids"]) == 4
