"""The KV-policy interface: this engine's "attention backend". Every policy (full, tailor, kivi, offload,
streaming, quest) implements it. Its `prepare` builds the step's StepState once; the model calls `layer_input`
and `attend` with it once per layer per step."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import ConfigError
from ..memory.layout import KVLayout
from ..memory.pages import PoolSpec
from ..models.config import ModelConfig
from .batch import ForwardBatch, StepState


class KVPolicy(ABC):
    name: str = ""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, **options):
        self.validate_options(**options)
        self.cfg, self.device, self.dtype = cfg, device, dtype

    @classmethod
    def validate_options(cls, **options) -> None:
        """Raise ConfigError for an option this policy does not take or a value it refuses; needs no model (runs
        before one loads)."""
        if options.get("host_kv_dtype") not in (None, "auto"):
            raise ConfigError(
                f"host_kv_dtype {options['host_kv_dtype']!r}: kv_policy {cls.name!r} keeps no KV rows in a "
                "host tier that decode reads (tailor does: --kv-policy tailor)"
            )
        options.pop("host_kv_dtype", None)
        if options:
            raise ConfigError(
                f"kv_policy {cls.name!r} takes no option(s): {', '.join(sorted(options))}"
            )

    def bind_model(self, model) -> None:
        """Called once with the loaded model (TailorKV's stage 1 uses the next layer's W_q and RoPE)."""

    def warm_up(self, prefix_sharing: bool) -> None:
        """Called once at start: run what compiles on first use, so that no request waits for it."""

    @abstractmethod
    def layout(
        self,
        gpu_bytes: int,
        host_bytes: int,
        copy_bytes: int | None,
        prefix_caching: bool,
        max_requests: int | None = None,
    ) -> KVLayout:
        """The policy's pools sized to the byte budgets of each tier, and what a request costs in them.
        `copy_bytes`: with prefix caching, how much of the GPU budget may hold copies of host-tier pages that
        prefills read back (None: what the other GPU pools leave); a policy whose prefills read nothing back
        ignores it. `prefix_caching`: requests with a common prompt prefix may share its pages. `max_requests`: at
        most that many run at once (None: no bound), for what a policy keeps per running request."""

    def prefill_workspace_bytes(self, context: int) -> int:
        """GPU memory a prefill step may take beyond the pools and the model's activations, for prompts of up to
        `context` tokens (the engine leaves it out of the KV budget)."""
        return 0

    @abstractmethod
    def allocate_storage(self, specs: list[PoolSpec]) -> None:
        """Create the preallocated tensors behind the pools (called once at engine start)."""

    @abstractmethod
    def add_request(
        self,
        rid: int,
        pages: dict[str, list[int]],
        prompt_len: int,
        partial_page: int | None = None,
    ) -> None:
        """Bind a newly admitted request to its pages; `partial_page`: the page (KVLayout.partial_block_pool) of
        the cached partial block whose tokens its prompt continues, read at its prefill."""

    @abstractmethod
    def grow(self, rid: int, pages: dict[str, list[int]]) -> None:
        """More pages for a decoding request (MemoryManager.grow), to follow those it holds in each pool."""

    def prepare(self, batch: ForwardBatch) -> StepState:
        """The step's state shared by all layers (slot indices, page tables, views), computed once before the
        forward and passed to every hook below."""
        return StepState(batch)

    def layer_input(
        self, layer: int, x: torch.Tensor, positions: torch.Tensor, step: StepState
    ) -> None:
        """The normalised input of `layer` (TailorKV's stage 1 predicts the next layer's query from it)."""

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepState
    ) -> torch.Tensor:
        """Append the batch's new k/v [T, Hkv, D] to the cache, return attention output [T, Hq, D] (causal)."""

    # ---- CUDA-graph decode (engine/cuda_graph.py): a decode step is captured once per shape and replayed ------------
    def graph_attention_layers(self) -> set[int]:
        """Layers whose decode `attend` may be captured in a CUDA graph; the others run eagerly between captured
        segments, on the real rows only."""
        return set()

    def prepare_for_graph(
        self, batch: ForwardBatch, rows: int, ahead: int = 0
    ) -> tuple[StepState, tuple] | None:
        """`prepare` for a decode batch padded to `rows` rows, run as a captured graph: (the step's state, the key
        of the static shapes the captured layers depend on), or None when the step must run eagerly. The tensors that
        captured layers read are the policy's static buffers of that shape, filled in place: a graph replays the
        tensors it was captured with. `ahead`: the buffers of the shape `graph_key(batch, ahead)`, which holds
        this step too (a graph captured before its rows need it)."""
        return self.prepare(batch), ()

    def graph_key(self, batch: ForwardBatch, ahead: int) -> tuple | None:
        """The key `prepare_for_graph` gives this decode batch's rows `ahead` tokens later (None: not graphed). A
        key that depends on the rows' lengths only grows: the shape `ahead` holds this step's rows as well."""
        return ()

    def join_streams(self, step: StepState) -> None:
        """Make the current stream wait for any side-stream work the step started (end of a captured segment)."""

    def finish(self, step: StepState) -> None:
        """After the forward of the step: every layer has stored its tokens."""

    @abstractmethod
    def release(self, rid: int) -> None:
        """Forget the request (its pages are returned by the MemoryManager)."""
