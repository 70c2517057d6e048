"""TailorKV plans of a model: which layers are quantization-friendly (the Q-layer plan) and how many tokens each
S layer fetches at a given context (the BudgetPlan of the `auto` preset). Shipped plans (the paper's Q layers, our
calibrated ones) live in plans/known.json and plans/budgets.json; plans calibrated on a user's machine are cached
under $XDG_CACHE_HOME/tailorkv/plans (default ~/.cache), one file per model:

- version 1: {"model", "quant_layers", "tau", "scores"};
- version 2: the same plus "version": 2 and "budget" (BudgetPlan.as_json, or null).

Every lookup returns (plan, source): "shipped plan", "cached calibration", or (None, None) when there is none."""

from __future__ import annotations

import json
import os
import re
from importlib import resources

from .budget import BudgetPlan

VERSION = 2
SHIPPED, CACHED, NEW = "shipped plan", "cached calibration", "new calibration"


def cache_dir() -> str:
    return os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tailorkv", "plans"
    )


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _shipped(file: str, name: str):
    """The entry of `file` whose key occurs in the model name (longest key wins), or None."""
    text = resources.files("tailorkv.kvcache").joinpath(f"plans/{file}").read_text()
    table = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    matches = [k for k in table if _key(k) in _key(name)]
    return table[max(matches, key=len)] if matches else None


def cached_plan_path(name: str) -> str:
    return os.path.join(cache_dir(), _key(name) + ".json")


def cached_plan(name: str) -> dict | None:
    """The cached plan file of `name` in the current format (a version-1 file has no budget), or None."""
    path = cached_plan_path(name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        plan = json.load(f)
    return {"version": VERSION, "budget": None, **plan}


def layer_plan(name: str) -> tuple[list[int] | None, str | None]:
    """The Q layers of model `name`: shipped, else cached."""
    plan = _shipped("known.json", name)
    if plan is not None:
        return plan, SHIPPED
    cached = cached_plan(name)
    return (cached["quant_layers"], CACHED) if cached else (None, None)


def budget_plan(name: str) -> tuple[BudgetPlan | None, str | None]:
    """The BudgetPlan of model `name`: shipped, else cached."""
    plan = _shipped("budgets.json", name)
    if plan is not None:
        return BudgetPlan.from_json(plan), SHIPPED
    cached = cached_plan(name)
    if cached and cached["budget"]:
        return BudgetPlan.from_json(cached["budget"]), CACHED
    return None, None


def save_plan(
    name: str, quant_layers: list[int], scores: list[float], tau: float, budget: BudgetPlan | None
) -> str:
    os.makedirs(cache_dir(), exist_ok=True)
    path = cached_plan_path(name)
    plan = {"version": VERSION, "model": name, "quant_layers": quant_layers, "tau": tau}
    plan |= {"scores": scores, "budget": budget and budget.as_json()}
    with open(path, "w") as f:
        json.dump(plan, f, indent=1)
    return path
