"""What a loader hands the engine: the model config, HF-named float tensors, and where the tokenizer comes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .config import ModelConfig


@dataclass
class TokenizerSource:
    """Either an HF directory (`path`) or a GGUF vocabulary (`tokens`, `merges`, `scores`, `token_types`)."""

    kind: str  # "hf_dir" | "gguf"
    path: str | None = None
    model: str | None = (
        None  # GGUF tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    )
    tokens: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False


@dataclass
class LoadedWeights:
    config: ModelConfig
    # lazily produced, so loading streams with a progress bar; a tensor, or a safetensors slice object read
    # when indexed
    tensors: Iterator[tuple[str, torch.Tensor | object]]
    num_tensors: int
    tokenizer: TokenizerSource | Callable[[], TokenizerSource]  # a callable: read when asked for
