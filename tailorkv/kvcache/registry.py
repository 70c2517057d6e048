"""Policy names -> classes; the one place that knows every policy."""
from __future__ import annotations

from ..errors import ConfigError
from .full import FullPolicy

POLICIES = {p.name: p for p in (FullPolicy,)}


def policy_class(name: str):
    if name not in POLICIES:
        raise ConfigError(f"unknown kv_policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]
