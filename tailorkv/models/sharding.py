"""Megatron-style tensor-parallel sharding of a Llama model: column-parallel QKV and gate/up, row-parallel o_proj
and down (one all-reduce each), vocab-parallel embedding and lm_head. KV heads are split evenly; when there are
fewer KV heads than ranks each is replicated over size / num_kv_heads ranks, as SGLang does."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .config import ModelConfig


def check_divisible(cfg: ModelConfig, size: int) -> None:
    """A ConfigError naming what `size` ranks cannot split evenly."""
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"tp_size must be a positive integer, got {size!r}")
    for name in ("num_heads", "intermediate_size", "vocab_size"):
        if getattr(cfg, name) % size:
            raise ConfigError(
                f"--tp {size} does not divide {cfg.name}'s {name} ({getattr(cfg, name)})"
            )
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        raise ConfigError(
            f"--tp {size} neither divides nor is a multiple of {cfg.name}'s num_kv_heads ({kv})"
        )


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The shapes one rank computes: its query and KV heads and its part of the MLP (the KV policy's view of the
    model); the vocabulary stays whole (the logits are gathered)."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // size,
        num_kv_heads=max(cfg.num_kv_heads // size, 1),
        intermediate_size=cfg.intermediate_size // size,
    )


def kv_heads(cfg: ModelConfig, rank: int, size: int) -> range:
    """The KV heads rank `rank` holds."""
    if cfg.num_kv_heads >= size:
        n = cfg.num_kv_heads // size
        return range(rank * n, (rank + 1) * n)
    first = rank * cfg.num_kv_heads // size
    return range(first, first + 1)


def shard_index(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, rank: int, size: int
) -> tuple[slice, ...] | None:
    """The index of rank `rank`'s slice of the full weight named `name` (HF names) of `shape`; None: the whole
    weight (norms; one rank)."""
    if size == 1:
        return None
    d = cfg.head_dim
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        heads = kv_heads(cfg, rank, size)
        return (slice(heads.start * d, heads.stop * d),)
    if name.endswith(
        (
            "q_proj.weight",
            "q_proj.bias",
            "gate_proj.weight",
            "up_proj.weight",
            "embed_tokens.weight",
            "lm_head.weight",
        )
    ):
        n = shape[0] // size
        return (slice(rank * n, (rank + 1) * n),)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        n = shape[1] // size
        return (slice(None), slice(rank * n, (rank + 1) * n))
    return None


def shard(name: str, w, cfg: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of the full weight `w` named `name`: a tensor of its own (the full one can be freed),
    or, from a lazily read weight (safetensors' get_slice), only that slice read."""
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w.get_shape())
    index = shard_index(name, shape, cfg, rank, size)
    if index is None:
        return w if isinstance(w, torch.Tensor) else w[:]
    part = w[index]
    return part.clone() if isinstance(w, torch.Tensor) else part
