"""EngineConfig: every setting of an engine in one dataclass. The CLI and the server build one, `Engine` reads it.

Building it checks every value, the KV policy's own options included, so a bad setting fails before seconds of
loading a model. Settings that depend on the model (a layer index, d_s against head_dim) are checked once it is
loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import ConfigError

DELAY_FACTOR = 0.35  # a burst's requests arrive within a third of a prefill step of each other (NOTES: 0.2 vs 0.35)


@dataclass(frozen=True)
class InputLimits:
    """What one request may ask for (SGLang-like defaults): beyond these it is a 400 before any work, so that one
    request cannot slow every step of the batch (`--input-limits '{"stop_strings": 256}'`)."""

    stop_strings: int = 128  # each one is searched in every new piece of text of its request
    stop_chars: int = 1024  # per stop string
    stop_token_ids: int = 1024
    stop_regex: int = 16
    stop_regex_chars: int = 256
    logit_bias: int = 1024  # entries
    n: int = 128  # completions per prompt
    grammar_chars: int = 32 * 1024  # json_schema / regex / ebnf text

    @classmethod
    def from_dict(cls, values: dict) -> InputLimits:
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ConfigError(
                f"unknown input limit(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
            )
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"input limit {k} must be a positive integer, got {v!r}")
        return cls(**values)


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file or dummy:<name>; None: the embedded SmolLM2
    kv_policy: str = "full"  # full | tailor | kivi | offload | streaming | quest
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    max_running_requests: int = 32
    max_queued_requests: int = 1024
    # prompt tokens a step computes at most; None: 8192 on CUDA (fewer re-reads of a long prompt's prefix, fuller
    # GEMMs), 2048 on CPU
    chunked_prefill_size: int | None = None
    # a step that carries decoding requests computes at most this many ms of prompt chunks with them (Sarathi-Serve's
    # latency target; a cost model fitted as the engine runs); None: 200 on CUDA, off (0) on CPU
    step_budget_ms: float | None = None
    # answer tokens a request reserves pages for at admission, and more each time it runs out (as it decodes)
    reserve_output_tokens: int = 256
    # a queued request that does not fit may be passed by this many later ones; then the queue waits for it
    max_passes: int = 16
    kv_cache_gib: float | None = None  # GPU-tier budget; None = a default for the device
    # host-tier budget per rank (pinned on CUDA); `tailorkv serve` on CUDA defaults to 3/4 of the memory available at
    # start, shared by the ranks (memory/host_memory.py default_host_gib)
    host_kv_gib: float = 4.0
    gpu_memory_limit_gib: float | None = None
    seed: int = 0
    enable_prefix_caching: bool = True  # share the K/V pages of common prompt prefixes
    # of the GPU-tier budget, GPU copies of cached host-tier pages (tailor); None = what the other pools leave
    prefix_gpu_gib: float | None = None
    cuda_graph: bool = True  # replay decode steps from captured CUDA graphs (on CUDA)
    # the norms, SwiGLU's gate and RoPE each fused into one kernel by torch.compile (models/elementwise.py); the first
    # steps of each shape compile (seconds, at the server's warm-up); None: on for CUDA (128k batch 1 on the H200: full
    # 10.62 -> 9.02 ms a token, tailor 12.09 -> 9.42), off elsewhere
    enable_torch_compile: bool | None = None
    # launch a decode step before the previous one's tokens reach the host (engine/overlap.py); one rank only; None:
    # on for CUDA at tp_size 1 (batch 16 at 32k on the H200: full 27.0 -> 23.1 ms a step, tailor 24.0 -> 22.2), off
    # elsewhere
    overlap_schedule: bool | None = None
    # tensor-parallel ranks, one process and device each; --kv-cache-gib and --host-kv-gib are per rank
    tp_size: int = 1
    progress: bool = True
    # the server holds a prefill for more arrivals this many times the last prefill step's time (0: off)
    scheduler_delay_factor: float = DELAY_FACTOR
    # output logprobs of the model's raw logits, or "processed": after penalties, logit bias, grammar masks and
    # temperature (vLLM's logprobs modes); prompt logprobs are raw
    logprobs_mode: str = "raw"
    input_limits: InputLimits = field(default_factory=InputLimits)
    # the KV policy's own options, e.g. tailor: tailor_preset, key_sketch, d_s, top_k (kvcache/tailor_config.py);
    # streaming and quest: tailor_preset, budget, sink
    policy_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in (
            "max_running_requests",
            "max_queued_requests",
            *(("chunked_prefill_size",) if self.chunked_prefill_size is not None else ()),
            "reserve_output_tokens",
            "tp_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.max_passes, int) or self.max_passes < 0:
            raise ConfigError(f"max_passes must be an integer >= 0, got {self.max_passes!r}")
        if self.overlap_schedule is True and self.tp_size > 1:
            raise ConfigError("overlap_schedule runs on one rank only (tp_size 1)")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ConfigError(f"logprobs_mode must be raw or processed, got {self.logprobs_mode!r}")
        for name in (
            "enable_prefix_caching",
            "cuda_graph",
            *(
                n
                for n in ("enable_torch_compile", "overlap_schedule")
                if getattr(self, n) is not None
            ),
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in (
            "kv_cache_gib",
            "host_kv_gib",
            "gpu_memory_limit_gib",
            "prefix_gpu_gib",
            "scheduler_delay_factor",
            "step_budget_ms",
        ):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
        # imported here: the policies import torch, which `tailorkv --help` need not wait for
        from .kvcache.registry import policy_class

        policy_class(self.kv_policy).validate_options(**self.policy_options)

    @classmethod
    def from_kwargs(
        cls, model=None, kv_policy: str = "full", device=None, dtype=None, **options
    ) -> EngineConfig:
        """`Engine(...)`'s arguments: settings by name (None: the default), any other name a policy option."""
        names = {f.name for f in fields(cls)} - {"policy_options"}
        if isinstance(options.get("input_limits"), dict):
            options["input_limits"] = InputLimits.from_dict(options["input_limits"])
        settings = {k: v for k, v in options.items() if k in names and v is not None}
        policy = {k: v for k, v in options.items() if k not in names}
        return cls(model, kv_policy, device, dtype, **settings, policy_options=policy)
