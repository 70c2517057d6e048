"""Calibration: one prefill of a calibration text through the CalibrationProbe gives each layer's dense preference
score (the layers above tau are quantization-friendly) and, at several context lengths (prefixes of that prompt),
the tokens each layer needs for the target attention mass, fitted into a BudgetPlan; both are cached beside the
model's name. Deterministic for a given text and model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.group import TPGroup
from ..errors import ConfigError
from ..essays import load_essays
from ..kvcache.budget import TARGET, BudgetPlan
from ..kvcache.calibrate import CalibrationProbe, plan_from_scores
from ..memory.pages import MemoryManager
from ..models.llama import LlamaModel
from ..models.sharding import local_config
from .runner import ModelRunner
from .tokenizer import Tokenizer

LONGEST = {
    "cpu": 8192,
    "cuda": 32768,
}  # the longest calibration prompt by device (a one-chunk prefill)
CONTEXTS = (2048, 4096, 8192, 16384)  # the budget is measured at these and at the prompt's length


@dataclass
class Calibration:
    scores: list[float]  # per layer: mass outside the top 5%
    quant_layers: list[int]
    budget: BudgetPlan


def calibration_ids(tok: Tokenizer, text: str | None, tokens: int) -> list[int]:
    if text is None:
        try:
            text = load_essays()
        except FileNotFoundError as e:
            raise ConfigError(f"no calibration text: {e}") from None
    ids = tok.encode_head(text, tokens)
    if len(ids) < 64:
        raise ConfigError(
            f"the calibration text is too short ({len(ids)} tokens; at least 64 needed)"
        )
    return ids


def prompt_ids(
    model: LlamaModel, tok: Tokenizer, device, text: str | None, tokens: int | None
) -> list[int]:
    """The calibration prompt: the first `tokens` tokens of `text` (default: the longest the device, model and text
    allow; the essays)."""
    longest = LONGEST.get(torch.device(device).type, LONGEST["cpu"])
    return calibration_ids(tok, text, min(tokens or longest, model.config.max_position))


def run_probe(
    model: LlamaModel, ids: list[int], device, dtype, target: float, group: TPGroup | None = None
) -> CalibrationProbe:
    """One prefill of `ids` through a CalibrationProbe measuring at CONTEXTS below len(ids) and at len(ids). Under
    tensor parallelism every rank runs it at once over its own heads."""
    contexts = [n for n in CONTEXTS if n < len(ids)] + [len(ids)]
    cfg = local_config(model.config, group.size) if group else model.config
    probe = CalibrationProbe(cfg, device, dtype, contexts, target)
    page = probe.layout(0, 0, 0, False)  # one page: its size and a request's cost
    need = page.pages_needed(len(ids), 0)
    layout = probe.layout(need["kv"] * page.pools[0].bytes_per_page, 0, 0, False)
    probe.allocate_storage(layout.pools)
    memory = MemoryManager(layout.pools)
    probe.add_request(0, memory.reserve(0, need), len(ids))
    ModelRunner(model, probe, device).forward([0], [0], [len(ids)], ids, [0])
    return probe


def measure(
    model: LlamaModel,
    ids: list[int],
    device,
    dtype,
    tau: float = 0.2,
    target: float = TARGET,
    keep_quant_layers: list[int] | None = None,
    group: TPGroup | None = None,
) -> Calibration:
    """The Calibration of prompt `ids`, with `keep_quant_layers` (a plan in force) as the Q layers if given. Under
    tensor parallelism every rank calls it at once: each measures its own KV heads and the ranks' means are
    averaged (the heads split evenly, so every rank ends with the mean over all heads and the same plan)."""
    with torch.inference_mode():
        probe = run_probe(model, ids, device, dtype, target, group)
    scores, tokens = probe.scores, probe.tokens
    if group:
        flat = torch.tensor(scores + [t for row in tokens for t in row], dtype=torch.float64)
        flat = (group.all_reduce(flat.to(device)) / group.size).tolist()
        scores, rest = flat[: len(scores)], flat[len(scores) :]
        width = len(tokens[0])
        tokens = [rest[i * width : (i + 1) * width] for i in range(len(scores))]
    c = probe.budget
    budget = BudgetPlan.fit(c["contexts"], tokens, target, (c["sink"], c["recent"]))
    plan = plan_from_scores(scores, tau) if keep_quant_layers is None else keep_quant_layers
    return Calibration(scores, plan, budget)
