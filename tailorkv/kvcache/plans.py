"""TailorKV layer plans: which layers are quantization-friendly. Shipped plans (the paper's and our calibrated
ones) live in plans/known.json; plans calibrated on a user's machine are cached under ~/.cache/tailorkv/plans."""

from __future__ import annotations

import json
import os
import re
from importlib import resources

CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tailorkv", "plans"
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def shipped_plans() -> dict[str, list[int]]:
    text = resources.files("tailorkv.kvcache").joinpath("plans/known.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def cached_plan_path(name: str) -> str:
    return os.path.join(CACHE_DIR, _key(name) + ".json")


def layer_plan(name: str) -> list[int] | None:
    """The Q layers of model `name`: a shipped plan whose key occurs in the name (longest key wins), else a
    cached calibration, else None."""
    key = _key(name)
    matches = [k for k in shipped_plans() if _key(k) in key]
    if matches:
        return shipped_plans()[max(matches, key=len)]
    path = cached_plan_path(name)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["quant_layers"]
    return None


def save_plan(name: str, quant_layers: list[int], scores: list[float], tau: float) -> str:
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = cached_plan_path(name)
    with open(path, "w") as f:
        json.dump(
            {"model": name, "quant_layers": quant_layers, "tau": tau, "scores": scores}, f, indent=1
        )
    return path
