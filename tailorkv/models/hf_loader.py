"""HF model directories: config.json + (sharded) *.safetensors + tokenizer.json or tokenizer.model."""

from __future__ import annotations

import glob
import json
import os

from ..errors import ModelLoadError
from .config import ModelConfig
from .weights import LoadedWeights, TokenizerSource


def load_hf_dir(path: str) -> LoadedWeights:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(
            f"{path} has no config.json; expected an HF model directory or a .gguf file"
        )
    with open(cfg_path) as f:
        cfg = ModelConfig.from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    from safetensors import safe_open

    handles = [safe_open(f, framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]

    tok_cfg = {}
    tc_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc_path):
        with open(tc_path) as f:
            tok_cfg = json.load(f)
    template = tok_cfg.get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja) as f:
            template = f.read()
    tok = TokenizerSource(
        kind="hf_dir",
        path=path,
        chat_template=template,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
    )

    def tensors():  # lazily read: a tensor-parallel rank reads only its slice (sharding.shard)
        for h, k in keys:
            yield k, h.get_slice(k)

    return LoadedWeights(cfg, tensors(), len(keys), tok)
