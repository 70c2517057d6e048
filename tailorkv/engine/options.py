"""Engine options beyond model / kv_policy / device / dtype, with validation (bad values fail at start)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError


@dataclass
class EngineOptions:
    max_running_requests: int = 32
    max_queued_requests: int = 1024
    chunked_prefill_size: int = 2048
    kv_cache_gib: float | None = None  # GPU-tier budget; None = a default for the device
    host_kv_gib: float = 4.0  # host-tier (pinned on CUDA) budget
    gpu_memory_limit_gib: float | None = None
    seed: int = 0
    enable_prefix_caching: bool = (
        True  # share the K/V pages of common prompt prefixes (policies that allow it)
    )
    # of the GPU-tier budget, GPU copies of cached host-tier pages (tailor); None = what the other pools leave
    prefix_gpu_gib: float | None = None
    cuda_graph: bool = True  # replay decode steps from captured CUDA graphs (on CUDA)
    progress: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> tuple["EngineOptions", dict]:
        """Split kwargs into engine options and the rest (policy options, validated by the policy)."""
        names = {f.name for f in fields(cls)}
        opts = cls(**{k: v for k, v in kwargs.items() if k in names and v is not None})
        for name in ("max_running_requests", "max_queued_requests", "chunked_prefill_size"):
            if not isinstance(getattr(opts, name), int) or getattr(opts, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(opts, name)!r}")
        for name in ("enable_prefix_caching", "cuda_graph"):
            if not isinstance(getattr(opts, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(opts, name)!r}")
        for name in ("kv_cache_gib", "host_kv_gib", "gpu_memory_limit_gib", "prefix_gpu_gib"):
            v = getattr(opts, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
        return opts, {k: v for k, v in kwargs.items() if k not in names}
