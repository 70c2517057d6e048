"""Calibration: one prefill of a calibration text through the CalibrationProbe gives each layer's dense preference
score; the model's layer plan (the layers above tau are quantization-friendly) is stored beside its name."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..essays import load_essays
from ..kvcache.calibrate import CalibrationProbe, plan_from_scores
from ..kvcache.plans import save_plan
from ..memory.pages import MemoryManager
from ..models.llama import LlamaModel
from .runner import ModelRunner
from .tokenizer import Tokenizer


def calibration_ids(tok: Tokenizer, text: str | None, tokens: int) -> list[int]:
    if text is None:
        try:
            text = load_essays()
        except FileNotFoundError as e:
            raise ConfigError(f"no calibration text: {e}") from None
    ids = tok.encode(text)[:tokens]
    if len(ids) < 64:
        raise ConfigError(
            f"the calibration text is too short ({len(ids)} tokens; at least 64 needed)"
        )
    return ids


def layer_scores(model: LlamaModel, ids: list[int], device, dtype) -> list[float]:
    """Dense preference score of every layer for one prefill of `ids`."""
    probe = CalibrationProbe(model.config, device, dtype)
    page = probe.layout(0, 0, 0, False)  # one page: its size and a request's cost
    need = page.pages_needed(len(ids), 0)
    layout = probe.layout(need["kv"] * page.pools[0].bytes_per_page, 0, 0, False)
    probe.allocate_storage(layout.pools)
    memory = MemoryManager(layout.pools)
    probe.add_request(0, memory.reserve(0, need), len(ids))
    ModelRunner(model, probe, device).forward([0], [0], [len(ids)], ids, [0])
    return probe.scores


def calibrate(
    model: LlamaModel,
    tok: Tokenizer,
    device,
    dtype,
    text: str | None = None,
    tokens: int = 4096,
    tau: float = 0.2,
) -> tuple[list[float], list[int]]:
    ids = calibration_ids(tok, text, min(tokens, model.config.max_position))
    with torch.inference_mode():
        scores = layer_scores(model, ids, device, dtype)
    plan = plan_from_scores(scores, tau)
    save_plan(model.config.name, plan, scores, tau)
    return scores, plan
