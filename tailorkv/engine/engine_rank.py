"""One rank's part of an engine: its device, its slice of the model, its KV policy with the policy's pools, and
the model runner. Without tensor parallelism the Engine has one; with it each process of the group has one."""

from __future__ import annotations

import logging
import os

import torch

from ..config import EngineConfig
from ..distributed.group import TPGroup
from ..errors import ConfigError
from ..kvcache.registry import policy_class
from ..memory.numa import bind_to_gpu_node
from ..models.llama import MLP_CHUNK
from ..models.loader import load_model
from ..models.sharding import local_config
from .calibration import Calibration, measure
from .runner import ModelRunner

GIB = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


log = logging.getLogger(__name__)


def pick_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"invalid device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but no CUDA GPU is available")
    return dev


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"invalid dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class EngineRank:
    def __init__(self, config: EngineConfig, device: torch.device, group: TPGroup | None = None):
        """Load this rank's slice of the model and make its KV policy (over its KV heads); `build_cache` then
        sizes the policy's pools. `group`: the tensor-parallel group, None without one."""
        self.options, self.device, self.group = config, device, group
        self.dtype = pick_dtype(config.dtype, device)
        if device.type == "cuda" and config.gpu_memory_limit_gib:
            # a hard cap on everything this process allocates (weights included), like a smaller card
            index = torch.cuda.current_device() if device.index is None else device.index
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, config.gpu_memory_limit_gib * GIB / total), index
            )
        lead = group is None or group.rank == 0
        if group:  # the host tier this rank page-locks lives on its GPU's NUMA node
            node = bind_to_gpu_node(device)
            if node is not None:
                log.info("tensor-parallel rank %d runs on NUMA node %d", group.rank, node)
        if group and device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.size))
        self.model, self.tokenizer_source = load_model(
            config.model, device, self.dtype, progress=config.progress and lead, tp=group
        )
        if config.enable_torch_compile:
            self.model = self.model.compiled()
        self.config = self.model.config
        self.policy = policy_class(config.kv_policy)(
            local_config(self.config, group.size if group else 1),
            device,
            self.dtype,
            **config.policy_options,
        )

    def calibrate(
        self, ids: list[int], tau: float, target: float, keep_quant_layers: list[int] | None
    ) -> Calibration:
        """Measure the calibration prompt `ids` (every rank at once under tensor parallelism) and give the policy
        the plans it lacked."""
        cal = measure(
            self.model, ids, self.device, self.dtype, tau, target, keep_quant_layers, self.group
        )
        if hasattr(self.policy, "use_calibration"):
            self.policy.use_calibration(cal.quant_layers, cal.budget)
        return cal

    def adopt(self, plans: dict) -> None:
        """Rank 0's TailorKV plans (`policy.plans()`), so that every rank runs the same."""
        self.policy.adopt(plans)

    def build_cache(self):
        """Bind the policy to the model, size and allocate its pools (every rank the same), warm it up and make
        the runner; returns the policy's KVLayout."""
        o = self.options
        self.policy.bind_model(self.model)
        gpu_bytes = self._gpu_kv_budget()
        if self.group:  # rank 0's budget for all: the ranks' pools must hold the same pages
            gpu_bytes = self.group.broadcast(gpu_bytes)
        copies = o.prefix_gpu_gib
        layout = self.policy.layout(
            gpu_bytes,
            int(o.host_kv_gib * GIB),
            None if copies is None else int(copies * GIB),
            o.enable_prefix_caching,
            o.max_running_requests,
        )
        self.policy.allocate_storage(layout.pools)
        self.policy.warm_up(prefix_sharing=layout.prefix_blocks is not None)
        self.runner = ModelRunner(
            self.model, self.policy, self.device, o.cuda_graph, o.max_running_requests
        )
        return layout

    def _gpu_kv_budget(self) -> int:
        o = self.options
        if o.kv_cache_gib is not None:
            return int(o.kv_cache_gib * GIB)
        if self.device.type != "cuda":
            return 2 * GIB
        # blocks the caching allocator holds but nothing uses (the load's temporaries, e.g. a dummy 8B model's
        # float32 draws: its 2 GiB embedding drawn and scaled) are the pools' to take; cudaMemGetInfo counts them
        # as used
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        cap = o.gpu_memory_limit_gib * GIB if o.gpu_memory_limit_gib else total
        c, item = self.config, self.dtype.itemsize
        # prefill activations: ~8 hidden-sized tensors per token, the MLP's 4 intermediate ones per chunk of it
        activations = (
            GIB
            + o.chunked_prefill_size * c.hidden_size * item * 8
            + min(o.chunked_prefill_size, MLP_CHUNK) * c.intermediate_size * item * 4
        )
        workspace = self.policy.prefill_workspace_bytes(c.max_position)
        room = min(cap - used, free)
        # the margin is a tenth of what the reservations leave, not of the room: they are upper bounds already (a
        # 126k tailor prompt under a 24 GiB cap on the H100 used 1.81 GiB beyond weights and KV against 3.88
        # reserved; with 17.85 GiB in use at start, a tenth of the room left its pools 0.2 GiB short of it)
        budget = max(int((room - activations - workspace) * 0.9), 0)
        # what is in use beyond PyTorch's reserve is the CUDA context's and libraries'; reserved beyond tensors,
        # blocks empty_cache could not release (a segment partly in use)
        log.info(
            "GPU KV budget %.2f GiB: 90%% of what is left of %.2f GiB free under %.1f GiB (%.2f GiB in use, %.2f "
            "GiB of it reserved by PyTorch, %.2f GiB in tensors, %.2f GiB of them parameters) after %.2f GiB of "
            "activations and %.2f GiB of prefill workspace",
            *(x / GIB for x in (budget, room, cap, used)),
            torch.cuda.memory_reserved(self.device) / GIB,
            torch.cuda.memory_allocated(self.device) / GIB,
            sum(p.numel() * p.element_size() for p in self.model.parameters()) / GIB,
            activations / GIB,
            workspace / GIB,
        )
        return budget
