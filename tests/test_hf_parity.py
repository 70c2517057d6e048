"""Against HF transformers on the same GGUF (float32): identical greedy tokens; and the same weights from GGUF
and from a converted HF safetensors directory give identical logits."""

import functools
import json
import os

import pytest
import torch

from tailorkv import Engine
from tailorkv.models.embedded import embedded_model_path
from tailorkv.models.gguf_loader import PlainReader
from tailorkv.models.loader import resolve

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She",
    "The three primary colors are",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]
NEW = 64


@pytest.fixture(scope="module")
def engine():
    # no prefix cache: both engines must run the same whole-prompt computation for bit-identical logits
    with Engine(progress=False, dtype="float32", enable_prefix_caching=False) as e:
        yield e


@pytest.fixture(scope="module")
def hf_model():
    import gguf

    # here, not at collection: 1.2 s on every worker
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = embedded_model_path()
    with pytest.MonkeyPatch.context() as mp:
        # for time only: transformers builds the same name map once per module and parses the header twice
        # (config, weights); PlainReader is gguf's own parse over a plain array
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        mp.setattr(gguf, "GGUFReader", PlainReader)
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()


def hf_greedy_choices(model, ids: list[int], continuation: list[int]) -> list[int]:
    """HF's greedy choice after the prompt and each prefix of `continuation`, from one causal forward pass: equal to
    `continuation` exactly when HF's greedy generation gives `continuation`."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids + continuation])).logits[0]
    return logits[len(ids) - 1 : -1].argmax(-1).tolist()


def test_greedy_tokens_equal_transformers(engine, hf_model):
    prompt_ids = [engine.tokenize(prompt, None) for prompt in PROMPTS]
    outs = engine.generate(
        input_ids=prompt_ids,
        sampling_params={"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True},
    )
    for prompt, ids, out in zip(PROMPTS, prompt_ids, outs):
        ours = out["output_ids"]
        assert len(ours) == NEW and ours == hf_greedy_choices(hf_model, ids, ours), prompt


def write_hf_dir(engine: Engine, directory: str) -> None:
    """Convert the embedded GGUF into config.json + sharded float32 safetensors + tokenizer files."""
    from safetensors.torch import save_file

    loaded = resolve(None, torch.device("cpu"))
    tensors = dict(loaded.tensors)
    names = sorted(tensors)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file(
            {k: tensors[k][:].contiguous() for k in part},
            os.path.join(directory, f"model-{i + 1:05d}-of-00002.safetensors"),
        )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(engine.config.to_hf(), f)
    engine.tokenizer.save_pretrained(directory)


def test_gguf_and_safetensors_give_identical_logits(engine, tmp_path):
    write_hf_dir(engine, str(tmp_path))
    with Engine(
        model=str(tmp_path), progress=False, dtype="float32", enable_prefix_caching=False
    ) as from_dir:
        assert from_dir.config.num_layers == 30 and from_dir.config.tie_word_embeddings
        for prompt in PROMPTS:
            ids = engine.tokenize(prompt, None)
            assert from_dir.tokenize(prompt, None) == ids
            assert torch.equal(engine.next_token_logits(ids), from_dir.next_token_logits(ids))
        chat = [{"role": "user", "content": "hi"}]
        assert from_dir.tokenizer.apply_chat_template(chat) == engine.tokenizer.apply_chat_template(
            chat
        )
