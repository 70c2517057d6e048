"""GGUF files (llama architecture) through the `gguf` package: config, dequantized weights, tokenizer vocabulary.

GGUF stores W_q and W_k rows permuted for the interleaved-pair RoPE; we un-permute them to the HF rotate-half layout
that `rope.Rotary` implements. Weights are dequantized when indexed (GGUFTensor), so a tensor-parallel rank
dequantizes only its slice.
"""

from __future__ import annotations

import functools
import os

import gguf
import numpy as np
import torch

from ..errors import ModelLoadError
from .config import ModelConfig
from .gguf_dequant import dequantize
from .weights import LoadedWeights, TokenizerSource

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUB = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _field(reader, name, default=None):
    f = reader.fields.get(name)
    if f is None:
        return default
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    v = f.parts[f.data[0]]
    return bytes(v).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


def unpermute_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GGUF (interleaved pairs) -> HF rotate-half row order for whole heads' rows of a q/k projection weight or
    bias (each head's rows are permuted among themselves)."""
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFTensor:
    """One weight of the file in HF layout [out, in], read and dequantized when indexed (as a safetensors slice
    is): rows, and columns on quantization-block bounds, are cut from the packed data first. `head_dim`: the rows
    are a q/k projection's, un-permuted per head (a row slice must hold whole heads)."""

    def __init__(self, tensor, head_dim: int | None = None):
        self.tensor, self.head_dim = tensor, head_dim

    def get_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensor.shape))

    def __getitem__(self, index) -> torch.Tensor:
        rows, *rest = index if isinstance(index, tuple) else (index,)
        cols = rest[0] if rest else slice(None)
        t = self.tensor
        data = t.data[rows]
        if data.dtype == np.uint8 and data.ndim == 2 and cols != slice(None):  # packed blocks
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            start, stop, step = cols.indices(self.get_shape()[-1])
            if step == 1 and start % block == 0 and stop % block == 0:
                data, cols = data[:, start // block * size : stop // block * size], slice(None)
        w = dequantize(data, t.tensor_type)  # its own memory
        if self.head_dim:
            w = unpermute_rows(w, self.head_dim)
        return w[..., cols].contiguous()


def load_gguf(path: str) -> LoadedWeights:
    """The file's config, tokenizer and (lazily dequantized) weights; the header is parsed once per process."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    reader, cfg, tok = _parse(os.path.realpath(path), st.st_size, st.st_mtime_ns)
    return LoadedWeights(cfg, _tensors(reader, cfg), len(reader.tensors), tok)


class PlainReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memmap: the parse slices the file ~10^6 times, and each slice
    of an np.memmap costs Python-level __getitem__/__array_finalize__ calls (3.6x the parse time)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)  # still backed by the mapping: tensors stay lazy

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
        """gguf's parse of a field, with an array of strings or scalars cut in one loop (a vocabulary is ~10^5
        strings: 3.4 s a process through gguf's call per element) into the same parts, data and types."""
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_item = self._get(orig_offs, np.uint32)
        item = gguf.GGUFValueType(raw_item[0])
        if item != gguf.GGUFValueType.STRING and item not in self.gguf_scalar_to_np:
            return super()._get_field_parts(orig_offs, raw_type)
        count = self._get(orig_offs + 4, np.uint64)
        n, offs, data = int(count[0]), orig_offs + 12, self.data
        parts = [raw_item, count]
        if item == gguf.GGUFValueType.STRING:
            for _ in range(n):
                size = data[offs : offs + 8].view(np.uint64)
                end = offs + 8 + int(size[0])
                parts += (size, data[offs + 8 : end])
                offs = end
            index = list(range(3, 2 + 2 * n, 2))
        else:
            values = self._get(offs, self.gguf_scalar_to_np[item], n)
            parts += [values[i : i + 1] for i in range(n)]
            index = list(range(2, 2 + n))
            offs += values.nbytes
        types = [gguf.GGUFValueType.ARRAY] + ([item] if n else [])
        return offs - orig_offs, parts, index, types


@functools.lru_cache(maxsize=4)
def _parse(path: str, size: int, mtime_ns: int) -> tuple:
    """(reader, ModelConfig, TokenizerSource): the field parse reads the whole vocabulary (100k+ strings), so
    every Engine of one file in a process shares it; size and mtime key it so a rewritten file is read again."""
    try:
        reader = PlainReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on non-GGUF files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}"
        )
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    heads = a("attention.head_count")
    names = {t.name for t in reader.tensors}
    scaling = None
    if a("rope.scaling.type") not in (None, "none"):
        raise ModelLoadError(f"unsupported GGUF rope scaling {a('rope.scaling.type')!r}")
    cfg = ModelConfig(
        name=_field(reader, "general.name") or os.path.basename(path),
        vocab_size=a("vocab_size") or len(tokens),
        hidden_size=a("embedding_length"),
        intermediate_size=a("feed_forward_length"),
        num_layers=a("block_count"),
        num_heads=heads,
        num_kv_heads=a("attention.head_count_kv", heads),
        head_dim=a("attention.key_length") or a("embedding_length") // heads,
        max_position=a("context_length"),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[_field(reader, "tokenizer.ggml.eos_token_id")],
        architecture=_ARCHS[arch],
    )
    tok = TokenizerSource(
        kind="gguf",
        path=path,
        model=_field(reader, "tokenizer.ggml.model"),
        tokens=tokens,
        merges=_field(reader, "tokenizer.ggml.merges", []),
        scores=_field(reader, "tokenizer.ggml.scores", []),
        token_types=_field(reader, "tokenizer.ggml.token_type", []),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids[0],
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )

    return reader, cfg, tok


def _tensors(reader, cfg: ModelConfig):
    for t in reader.tensors:
        if t.name in _TOP:
            yield _TOP[t.name], GGUFTensor(t)
            continue
        _, i, kind, suffix = t.name.split(".")
        head_dim = cfg.head_dim if kind in ("attn_q", "attn_k") else None
        yield f"model.layers.{i}.{_SUB[kind]}.{suffix}", GGUFTensor(t, head_dim)
