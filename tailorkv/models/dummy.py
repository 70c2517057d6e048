"""`dummy:<name>`: random weights of a named architecture with a fixed seed, for speed work without a download.

The tokenizer is the embedded model's (its 49,152 ids are valid in every shape listed here).
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from .config import ModelConfig
from .weights import LoadedWeights

# Llama 3.1's context and RoPE (8B and 70B)
LLAMA3_1 = dict(
    vocab_size=128256,
    max_position=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
# small shapes whose KV heads split over 2, 4 and 8 tensor-parallel ranks
TINY_TP = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=8,
    head_dim=32,
    max_position=8192,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        **LLAMA3_1,
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_position=32768,
        rope_theta=10000.0,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        **LLAMA3_1,
    ),
    "tiny-kv4": dict(**TINY_TP, num_kv_heads=4),
    "tiny-kv8": dict(**TINY_TP, num_kv_heads=8),
    "tiny": dict(
        vocab_size=49152,
        hidden_size=192,
        intermediate_size=384,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        head_dim=32,
        max_position=8192,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


def dummy_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ModelLoadError(f"unknown dummy model {name!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(name=f"dummy:{name}", bos_token_id=1, eos_token_ids=[2], **SHAPES[name])


def load_dummy(name: str, device: torch.device, seed: int = 0) -> LoadedWeights:
    """Random N(0, 0.02) linear/embedding weights and unit norms, generated on `device` (fast for 8B on a GPU)."""
    from .embedded import embedded_tokenizer_source

    cfg = dummy_config(name)
    from .llama import LlamaModel, hf_names, part_sizes

    with torch.device("meta"):
        fused = LlamaModel(cfg).state_dict().items()
    sizes = part_sizes(cfg)
    # HF names, in the order (and so with the random numbers) of the unfused model
    shapes = {n: s for k, v in fused for n, s in hf_names(k, v.shape, sizes)}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    gen = torch.Generator(device=device).manual_seed(seed)

    def tensors():
        for k, shape in shapes.items():
            if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
                yield k, torch.ones(shape, device=device)
            else:
                yield k, torch.randn(shape, generator=gen, device=device) * 0.02

    return LoadedWeights(cfg, tensors(), len(shapes), embedded_tokenizer_source)
