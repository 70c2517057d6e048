"""The KV-policy interface: this engine's "attention backend". Every policy (full, tailor, kivi, offload,
streaming, quest) implements it; the model calls `layer_input` and `attend` once per layer per step."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import ConfigError
from ..models.config import ModelConfig
from .batch import ForwardBatch
from .pages import PoolSpec


class KVPolicy(ABC):
    name: str = ""

    # Some policies need the whole prompt in one prefill step (e.g. tailor: offload and max|K| over all of it).
    whole_prompt_prefill: bool = False

    # Prefix caching: generated tokens' K/V sits in the same pages as the prompt's, so a finished request's output
    # may be cached for the next turn of a chat.
    caches_output: bool = True

    # Prefix caching of a prompt's partly filled last block (prefix_cache.py): the pool of the block's page that
    # holds its tokens' exact K/V, which a request continuing them reads; None: only full blocks are cached.
    partial_block_pool: str | None = None

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, **options):
        if options:
            raise ConfigError(
                f"kv_policy {self.name!r} takes no option(s): {', '.join(sorted(options))}"
            )
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def prefix_blocks(self) -> tuple[int, dict[str, int]] | None:
        """(tokens per block, pages per block in each shared pool) when requests with a common prompt prefix may
        share its K/V pages (prefix_cache.py), block i holding tokens i*tokens ..; None when they may not."""
        return None

    def shareable_tokens(self, prompt_len: int) -> int:
        """Prompt tokens whose stored K/V is final once the prompt is computed (only those blocks are shared)."""
        return prompt_len

    def bind_model(self, model) -> None:
        """Called once with the loaded model (TailorKV's stage 1 uses the next layer's W_q and RoPE)."""

    def warm_up(self, prefix_sharing: bool) -> None:
        """Called once at start: run what compiles on first use, so that no request waits for it."""

    @abstractmethod
    def pool_specs(
        self, gpu_bytes: int, host_bytes: int, copy_bytes: int | None = 0
    ) -> list[PoolSpec]:
        """The pools this policy needs, sized to the given byte budgets of each tier. `copy_bytes`: of the GPU
        budget, how much may hold copies of host-tier pages that prefills read back (shared prefixes; None: what
        the other GPU pools leave); a policy whose prefills read nothing back ignores it."""

    @abstractmethod
    def pages_needed(self, prompt_len: int, max_new_tokens: int) -> dict[str, int]:
        """Pages of each pool a request holds for its whole life (reserved at admission)."""

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
        """Bind a newly admitted request to its pages; `partial_page`: the page (partial_block_pool) of the cached
        partial block whose tokens its prompt continues, read at its prefill."""

    def prepare(self, batch: ForwardBatch) -> None:
        """Per-step metadata shared by all layers (slot indices, page tables), computed once before the forward."""

    def layer_input(
        self, layer: int, x: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> None:
        """The normalised input of `layer` (TailorKV's stage 1 predicts the next layer's query from it)."""

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Append the batch's new k/v [T, Hkv, D] to the cache, return attention output [T, Hq, D] (causal)."""

    # ---- CUDA-graph decode (engine/cuda_graph.py): a decode step is captured once per shape and replayed ------------
    def graph_attention_layers(self) -> set[int]:
        """Layers whose decode `attend` may be captured in a CUDA graph; the others run eagerly between captured
        segments, on the real rows only."""
        return set()

    def graph_key(self, batch: ForwardBatch, rows: int) -> tuple | None:
        """Prepare a decode batch padded to `rows` rows for a captured step (instead of `prepare`) and return the
        static shapes the captured layers depend on, or None when this step must run eagerly."""
        self.prepare(batch)
        return ()

    def join_streams(self) -> None:
        """Make the current stream wait for any side-stream work the policy started (end of a captured segment)."""

    def finish(self, batch: ForwardBatch) -> None:
        """After the forward of `batch`: every layer has stored the step's tokens."""

    @abstractmethod
    def release(self, rid: int) -> None:
        """Forget the request (its pages are returned by the MemoryManager)."""

    def kv_bytes(self) -> dict[str, int]:
        """Bytes of KV storage per tier ("gpu", "host") that this policy allocated."""
        return {}
