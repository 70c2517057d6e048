"""Policy names -> classes; the one place that knows every policy."""

from __future__ import annotations

from ..errors import ConfigError
from .baselines import OffloadPolicy, QuestPolicy, StreamingPolicy
from .full import FullPolicy
from .tailor import KiviPolicy, TailorPolicy

POLICIES = {
    p.name: p
    for p in (FullPolicy, TailorPolicy, KiviPolicy, OffloadPolicy, StreamingPolicy, QuestPolicy)
}


def policy_class(name: str):
    if name not in POLICIES:
        raise ConfigError(f"unknown kv_policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]
