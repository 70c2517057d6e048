"""Calibration: one prefill of a calibration text through the CalibrationProbe gives each layer's dense preference
score (the layers above tau are quantization-friendly) and, at several context lengths (prefixes of that prompt),
the tokens each layer needs for the target attention mass, fitted into a BudgetPlan; both are cached beside the
model's name. Deterministic for a given text and model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..essays import load_essays
from ..kvcache.budget import TARGET, BudgetPlan
from ..kvcache.calibrate import CalibrationProbe, plan_from_scores
from ..kvcache.plans import save_plan
from ..memory.pages import MemoryManager
from ..models.llama import LlamaModel
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
    ids = tok.encode(text)[:tokens]
    if len(ids) < 64:
        raise ConfigError(
            f"the calibration text is too short ({len(ids)} tokens; at least 64 needed)"
        )
    return ids


def run_probe(model: LlamaModel, ids: list[int], device, dtype, target: float) -> CalibrationProbe:
    """One prefill of `ids` through a CalibrationProbe measuring at CONTEXTS below len(ids) and at len(ids)."""
    contexts = [n for n in CONTEXTS if n < len(ids)] + [len(ids)]
    probe = CalibrationProbe(model.config, device, dtype, contexts, target)
    page = probe.layout(0, 0, 0, False)  # one page: its size and a request's cost
    need = page.pages_needed(len(ids), 0)
    layout = probe.layout(need["kv"] * page.pools[0].bytes_per_page, 0, 0, False)
    probe.allocate_storage(layout.pools)
    memory = MemoryManager(layout.pools)
    probe.add_request(0, memory.reserve(0, need), len(ids))
    ModelRunner(model, probe, device).forward([0], [0], [len(ids)], ids, [0])
    return probe


def calibrate(
    model: LlamaModel,
    tok: Tokenizer,
    device,
    dtype,
    text: str | None = None,
    tokens: int | None = None,
    tau: float = 0.2,
    target: float = TARGET,
    keep_quant_layers: list[int] | None = None,
) -> Calibration:
    """Calibrate on the first `tokens` tokens of `text` (default: the longest the device, model and text allow;
    the essays) and cache the result, with `keep_quant_layers` (a plan in force) as the Q layers if given."""
    longest = LONGEST.get(torch.device(device).type, LONGEST["cpu"])
    ids = calibration_ids(tok, text, min(tokens or longest, model.config.max_position))
    with torch.inference_mode():
        probe = run_probe(model, ids, device, dtype, target)
    c = probe.budget
    budget = BudgetPlan.fit(c["contexts"], probe.tokens, target, (c["sink"], c["recent"]))
    plan = plan_from_scores(probe.scores, tau) if keep_quant_layers is None else keep_quant_layers
    cal = Calibration(probe.scores, plan, budget)
    save_plan(model.config.name, cal.quant_layers, cal.scores, tau, budget)
    return cal
