"""The Llama family in plain torch: RMSNorm, RoPE, GQA attention, SwiGLU; tied embeddings and QKV bias optional.

The forward pass runs on a flat batch of tokens from many sequences ([T, hidden]); attention is delegated to the
engine's KV policy (`kv.attend`), which owns the cache and knows where each sequence's tokens live. With a
tensor-parallel group each rank holds its slice of every layer (sharding.py) and the partial sums meet in one
all-reduce after o_proj and one after the MLP; the logits are gathered from the ranks' vocabulary slices.
q, k and v are one GEMM (qkv_proj) and gate and up one (gate_up_proj): the loaders hand HF-named weights and
load_model concatenates each rank's slices (FUSED); hf_state_dict splits them back. The norms, SwiGLU's gate and
RoPE run through `ops` (elementwise.py), which `compiled` swaps for torch.compile's fused kernels.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .elementwise import Elementwise, rms_norm, silu_mul
from .rope import Rotary
from .sharding import local_config

MLP_CHUNK = 8192  # tokens per MLP call in a long prefill
# fused projection -> the HF projections concatenated (in this order, along the output dim) into it
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.sizes = part_sizes(cfg)["qkv_proj"]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def project_q(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        """RoPE(W_q x) as [T, heads, head_dim]; TailorKV's stage 1 also calls it to predict the next layer's query."""
        n, bias = self.sizes[0], self.qkv_proj.bias
        q = F.linear(x, self.qkv_proj.weight[:n], None if bias is None else bias[:n])
        return rotary.apply(q.view(-1, self.num_heads, self.head_dim), positions)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary):
        """q [T, heads, D], k, v [T, kv_heads, D] (RoPE applied to q and k): the inputs of the KV policy's attend."""
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = rotary.apply(q.reshape(-1, self.num_heads, self.head_dim), positions)
        k = rotary.apply(k.reshape(-1, self.num_kv_heads, self.head_dim), positions)
        return q, k, v.reshape(-1, self.num_kv_heads, self.head_dim).contiguous()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, act=silu_mul) -> torch.Tensor:
        """`act`: SwiGLU's gate (elementwise.silu_mul or its compiled form)."""
        if x.shape[0] <= MLP_CHUNK:
            return self.down_proj(act(self.gate_up_proj(x)))
        # a long prefill in chunks: the intermediate activations of all tokens at once would not fit a small GPU
        return torch.cat([self(part, act) for part in x.split(MLP_CHUNK)])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    """Parameter names follow HF (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""

    def __init__(self, cfg: ModelConfig, tp=None):
        """`tp`: the tensor-parallel group (distributed.group.TPGroup) this rank belongs to, or None."""
        super().__init__()
        self.config, self.tp = cfg, tp
        size = tp.size if tp else 1
        local = local_config(cfg, size)
        self.model = nn.Module()
        # built on the meta device, its weights assigned at load; with no _weight, Embedding draws a normal_, which
        # on meta tensors imports Dynamo (2 s a process)
        shape = (cfg.vocab_size // size, cfg.hidden_size)
        self.model.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.model.layers = nn.ModuleList(DecoderLayer(local) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // size, bias=False)
        self.rotary: Rotary | None = None
        self.ops = Elementwise()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def setup_rotary(self, device, dtype) -> None:
        cfg = self.config
        self.rotary = Rotary(
            cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling, device, dtype
        )

    def compiled(self) -> LlamaModel:
        """--enable-torch-compile: this model (the same weights, left as they are) with the norms, SwiGLU's gate
        and RoPE each run as one kernel from torch.compile."""
        view = copy.copy(self)
        view.ops, view.rotary = Elementwise(compiled=True), copy.copy(self.rotary)
        view.rotary.rotate = view.ops.rope
        return view

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv, step) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for the flat batch of tokens `input_ids` [T]; `step`: the
        StepState that the KV policy `kv` prepared for it."""
        h = self.embed(input_ids)
        for i in range(len(self.model.layers)):
            h = self.layer_output(
                i, h, kv.attend(i, *self.attention_inputs(i, h, positions, kv, step), step)
            )
        return self.final_norm(h)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.model.norm
        return self.ops.rms_norm(h, norm.weight, norm.eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(ids)
        n = self.model.embed_tokens.num_embeddings  # this rank's vocabulary slice
        local = ids - self.tp.rank * n
        outside = (local < 0) | (local >= n)
        h = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self._reduce(h.masked_fill(outside[:, None], 0))

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp is None else self.tp.all_reduce(x)

    def attention_inputs(self, i: int, h: torch.Tensor, positions: torch.Tensor, kv, step):
        """Layer i up to its attention: q, k, v of the residual stream h [T, hidden]."""
        layer = self.model.layers[i]
        norm = layer.input_layernorm
        x = self.ops.rms_norm(h, norm.weight, norm.eps)
        kv.layer_input(i, x, positions, step)
        return layer.self_attn.qkv(x, positions, self.rotary)

    def layer_output(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Layer i after its attention: the residual stream once attention output attn [T, heads, D] and the MLP
        are added."""
        layer, norm = self.model.layers[i], self.model.layers[i].post_attention_layernorm
        o = self._reduce(layer.self_attn.o_proj(attn.reshape(h.shape[0], -1)))
        h, x = self.ops.add_rms_norm(h, o, norm.weight, norm.eps)
        return h + self._reduce(layer.mlp(x, self.ops.silu_mul))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return (logits if self.tp is None else self.tp.all_gather(logits)).float()


def fused_name(name: str) -> tuple[str, int, int] | None:
    """(the fused parameter an HF-named one is part of, its index among the parts, their count), or None."""
    module, _, param = name.rpartition(".")
    prefix, _, proj = module.rpartition(".")
    for fused, parts in FUSED.items():
        if proj in parts:
            return f"{prefix}.{fused}.{param}", parts.index(proj), len(parts)
    return None


def hf_names(name: str, shape: torch.Size, sizes: dict[str, list[int]]) -> list[tuple[str, tuple]]:
    """The HF-named parameters (name, shape) a parameter of this model holds: the parts of a fused one (split by
    `sizes`, its parts' lengths along the output dim), else itself."""
    module, _, param = name.rpartition(".")
    prefix, _, proj = module.rpartition(".")
    if proj not in FUSED:
        return [(name, tuple(shape))]
    lengths = sizes[proj]
    return [(f"{prefix}.{part}.{param}", (n, *shape[1:])) for part, n in zip(FUSED[proj], lengths)]


def part_sizes(cfg: ModelConfig) -> dict[str, list[int]]:
    """Output lengths of each fused projection's parts for a model (or one rank's local) config."""
    d = cfg.head_dim
    return {
        "qkv_proj": [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d],
        "gate_up_proj": [cfg.intermediate_size] * 2,
    }


def hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The model's parameters under HF names, fused ones split back into views of their parts."""
    sizes = part_sizes(local_config(model.config, model.tp.size if model.tp else 1))
    out = {}
    for name, t in model.state_dict().items():
        parts = hf_names(name, t.shape, sizes)
        for (part, _), view in zip(parts, t.split([s[0] for _, s in parts])):
            out[part] = view
    return out
