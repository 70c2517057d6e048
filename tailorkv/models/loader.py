"""Resolve a `--model` argument (None, `dummy:<name>`, an HF directory or a .gguf file) into a ready LlamaModel."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from ..errors import ModelLoadError
from .cpu_linear import pack_linears
from .dummy import load_dummy
from .embedded import EMBEDDED_NAME, embedded_model_path
from .gguf_loader import load_gguf
from .hf_loader import load_hf_dir
from .llama import LlamaModel, fused_name
from .sharding import check_divisible, shard
from .weights import LoadedWeights


def _is_embedded(model: str | None) -> bool:
    return model is None or model in ("default", "embedded")


def resolve(model: str | None, device: torch.device) -> LoadedWeights:
    if _is_embedded(model):
        loaded = load_gguf(embedded_model_path())
        loaded.config.name = EMBEDDED_NAME
        return loaded
    if model.startswith("dummy:"):
        return load_dummy(model.split(":", 1)[1], device)
    if not os.path.exists(model):
        raise ModelLoadError(f"model path {model!r} does not exist")
    if os.path.isdir(model):
        return load_hf_dir(model)
    if model.endswith(".gguf"):
        return load_gguf(model)
    raise ModelLoadError(f"{model!r} is neither an HF model directory nor a .gguf file")


# On CPU a process may load one model many times (every Engine of it; the test suite ~90 times): the last model's
# weights in its dtype and their oneDNN-packed copies are kept for the next load of it (2.4 s for the embedded
# model), shared read-only by its Engines. Not on a GPU, where a kept model would hold its memory after its Engine.
_kept: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}


def _keep_key(model: str | None, device: torch.device, dtype: torch.dtype, rank: int, size: int):
    if device.type != "cpu":
        return None
    path = embedded_model_path() if _is_embedded(model) else model
    stamp = None if path.startswith("dummy:") else os.stat(path).st_mtime_ns
    return path, stamp, dtype, rank, size


def load_model(
    model: str | None, device: torch.device, dtype: torch.dtype, progress: bool = True, tp=None
):
    """Build the model on `device` in `dtype`; returns (LlamaModel, TokenizerSource). `tp`: the tensor-parallel
    group (distributed.group.TPGroup) whose rank's slice of each weight this process keeps, or None; ranks other
    than 0 get no tokenizer (None)."""
    loaded = resolve(model, device)
    rank, size = (tp.rank, tp.size) if tp else (0, 1)
    check_divisible(loaded.config, size)
    with torch.device("meta"):
        net = LlamaModel(loaded.config, tp)
    key = _keep_key(model, device, dtype, rank, size)
    if key in _kept:
        state, packed = _kept[key]
    else:
        state, packed = (
            _read(loaded, set(net.state_dict()), device, dtype, rank, size, progress),
            {},
        )
    net.load_state_dict(state, assign=True, strict=True)
    net.requires_grad_(False)  # inference only (Dynamo guards on the flag)
    net.setup_rotary(device, dtype)
    pack_linears(net, packed)
    if key is not None:
        _kept.clear()
        _kept[key] = state, packed
    tok = loaded.tokenizer
    if rank:
        tok = None
    elif callable(tok):
        tok = tok()
    return net.eval(), tok


def _read(
    loaded: LoadedWeights,
    expected: set[str],
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    size: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """This rank's slice of every weight, on `device` in `dtype`, the fused ones (qkv, gate_up) concatenated."""
    state = {}
    bar = tqdm(
        loaded.tensors,
        total=loaded.num_tensors,
        desc=f"loading {loaded.config.name}",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    parts: dict[str, dict[int, torch.Tensor]] = {}  # a fused weight's parts read so far, by index
    for name, t in bar:
        fused = fused_name(name)
        if (fused[0] if fused else name) not in expected:
            if "rotary_emb" in name:
                continue
            raise ModelLoadError(f"unexpected weight {name!r} in {loaded.config.name}")
        local = shard(name, t, loaded.config, rank, size).to(device=device, dtype=dtype)
        if fused is None:
            state[name] = local
            continue
        whole, index, count = fused
        got = parts.setdefault(whole, {})
        got[index] = local
        if len(got) == count:  # this rank's slices, concatenated
            state[whole] = torch.cat([got[i] for i in range(count)])
            del parts[whole]
    if loaded.config.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = expected - state.keys()
    if missing:
        raise ModelLoadError(
            f"{loaded.config.name} lacks weights: {', '.join(sorted(missing)[:4])} ..."
        )
    return state
