"""`tailorkv calibrate`: run one prefill of a calibration text through the CalibrationProbe, print the per-layer
dense preference scores and store the model's layer plan (the layers above tau are quantization-friendly)."""

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


def run_calibration(args) -> None:
    from ..cli import engine_kwargs
    from .engine import Engine

    text = None
    if args.text:
        try:
            with open(args.text) as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read --text {args.text}: {e.strerror}") from None
    with Engine(**{**engine_kwargs(args), "kv_policy": "full", "kv_cache_gib": 0.01}) as engine:
        scores, plan = calibrate(
            engine.model, engine.tokenizer, engine.device, engine.dtype, text, args.tokens, args.tau
        )
    print(f"{'layer':>5}  {'score':>7}  kind")
    for i, s in enumerate(scores):
        print(f"{i:>5}  {s:7.4f}  {'Q (quantize)' if s > args.tau else 'S (offload + top-k)'}")
    print(f"plan for {engine.config.name} (tau={args.tau}): quant_layers={plan}")
