"""`tailor`: the TailorKV hybrid cache. Q layers keep a 1/2-bit KIVI cache on the GPU; S layers keep the prompt
in the host tier and, each decode step, attend exactly over sink + recent + the top-k dominant prompt tokens
(two-stage retrieval, selection.py) + every generated token. Prefill is exact full attention over the prompt, in
chunks (decode rows ride along): a chunk attends to the prompt's earlier tokens read back from the host tier, where
every layer's exact rows are kept (from their GPU copies where pages have one)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..kernels import kivi
from ..kernels.attention import causal_attention, shared_prefix_attention
from ..memory.device_copies import PrefixReads
from ..memory.host_memory import to_device
from ..memory.layout import KVLayout
from ..memory.pages import PoolSpec
from .batch import ForwardBatch, StepState
from .budget import BudgetPlan
from .offload_store import (
    HOST_PAGE,
    DecodeView,
    OffloadState,
    OffloadStore,
    SharedPrefix,
    page_runs,
)
from .plans import NEW, budget_plan, layer_plan
from .policy import KVPolicy
from .prompt_rows import PrefillGroup
from .quant_store import QuantState, QuantStore, QuantView
from .selection import EAGER, Selection, score_tokens
from .tailor_config import DEFAULT_PRESET, TailorConfig, default_preset

PAGE = 64
MAX_SLOTS = 256  # per-request window slots: an upper bound on running requests


@dataclass
class TailorStep(StepState):
    """What the layers of one tailor (or kivi) step read:
    - view, qview: the decode rows' DecodeView (S layers) and QuantView (Q layers); None without decode rows;
    - decode_rows [B]: the decode rows' tokens in the batch (a slice when they are all of it);
    - prefill: the prefill rows grouped by the shared prefix they continue, with each group's PrefillGroup;
    - critical: what layer l's input starts for layer l+1's attend, double-buffered by layer parity: stage-1
      reads (channels, keys, ready event), or with speculative_fetch the fetched top-k rows (rows, valid, the
      predicted query, ready event);
    - reads: shared-prefix reads started one layer ahead, by (layer, rows)."""

    view: DecodeView | None = None
    qview: QuantView | None = None
    decode_rows: torch.Tensor | slice | None = None
    prefill: list[tuple[list[int], PrefillGroup]] = field(default_factory=list)
    critical: dict[int, tuple] = field(default_factory=dict)
    reads: dict[tuple, tuple] = field(default_factory=dict)


class TailorPolicy(KVPolicy):
    name = "tailor"

    def __init__(
        self,
        cfg,
        device,
        dtype,
        tailor_preset: str | None = None,
        host_on_device: bool = False,
        **options,
    ):
        super().__init__(cfg, device, dtype)
        preset = tailor_preset or default_preset(cfg.name)
        self.tc = TailorConfig.from_options(preset, **options)
        self.host_on_device = bool(
            host_on_device
        )  # the host tier in device memory: accuracy runs on a big GPU
        # where the Q layers and the budget come from: an option, a shipped plan, a cached or a new calibration
        self.sources = {"quant_layers": "option", "budget": "preset"}
        self.plan_missing = self.budget_missing = False
        if self.tc.quant_layers is None:
            plan, self.sources["quant_layers"] = layer_plan(cfg.name)
            self.plan_missing = plan is None
            self.tc.quant_layers = plan or []
        self.tc.validate(cfg.num_layers, cfg.head_dim)
        if self.tc.fp8_rows and len(self.tc.quant_layers) >= cfg.num_layers:
            raise ConfigError(
                "host_kv_dtype fp8 stores the sparsity-friendly layers' host rows in 8 bits; "
                f"this plan quantizes all {cfg.num_layers} layers, so there are none"
            )
        kivi.value_group(self.tc.group_size, cfg.head_dim, self.tc.quant_bits)
        self.set_quant_layers(self.tc.quant_layers)
        self.budget: BudgetPlan | None = (
            None  # per-layer top_k by context; None: tc.top_k everywhere
        )
        if preset == "auto" and options.get("top_k") is not None:
            self.sources["budget"] = "option"
        elif preset == "auto" and self.s_index:
            self.budget, self.sources["budget"] = budget_plan(cfg.name)
            self.budget_missing = self.budget is None

    def use_calibration(self, quant_layers: list[int] | None, budget: BudgetPlan | None) -> None:
        """Take what a calibration at start measured for the plans that were missing."""
        if self.plan_missing and quant_layers is not None:
            self.set_quant_layers(quant_layers)
            self.sources["quant_layers"], self.plan_missing = NEW, False
        if self.budget_missing and budget is not None:
            self.budget, self.sources["budget"], self.budget_missing = budget, NEW, False

    def plans(self) -> dict:
        """The Q layers and budget in force, and where they came from."""
        return {
            "quant_layers": self.tc.quant_layers,
            "budget": self.budget,
            "sources": dict(self.sources),
        }

    def adopt(self, plans: dict) -> None:
        """Another rank's `plans()` (tensor parallelism: rank 0's, whatever this rank's cache holds)."""
        self.set_quant_layers(plans["quant_layers"])
        self.budget, self.sources = plans["budget"], dict(plans["sources"])
        self.plan_missing = self.budget_missing = False

    def layer_top_k(self, context: int) -> list[int]:
        """top_k of every S layer (in s_index order) for a request of `context` prompt tokens."""
        if self.budget is None:
            return [self.tc.top_k] * len(self.s_index)
        return [self.budget.top_k(layer, context) for layer in self.s_index]

    def settings(self, context: int) -> dict:
        """The TailorKV settings in force, each S layer's top_k at `context` prompt tokens, and their sources."""
        t = self.tc
        ks = self.layer_top_k(context)
        return {
            "preset": t.preset,
            "quant_layers": t.quant_layers,
            "quant_layers_source": self.sources["quant_layers"],
            "quant_bits": t.quant_bits,
            "key_sketch": t.key_sketch,
            "d_s": t.d_s,
            "sink": t.sink,
            "recent": t.recent,
            "context": context,
            "top_k": dict(zip(map(str, self.s_index), ks)),
            "mean_budget": t.sink + t.recent + sum(ks) / max(len(ks), 1),
            "budget_source": self.sources["budget"],
            **({"mass_target": self.budget.target} if self.budget else {}),
        }

    @classmethod
    def validate_options(
        cls, tailor_preset: str | None = None, host_on_device: bool = False, **options
    ) -> None:
        TailorConfig.from_options(tailor_preset, **options).validate()

    def set_quant_layers(self, layers: list[int]) -> None:
        self.tc.quant_layers = sorted(set(layers))
        self.q_index = {layer: i for i, layer in enumerate(self.tc.quant_layers)}
        s_layers = [i for i in range(self.cfg.num_layers) if i not in self.q_index]
        self.s_index = {layer: i for i, layer in enumerate(s_layers)}

    def bind_model(self, model) -> None:
        """The model whose next layer's query stage 1 predicts; a compiled one (--enable-torch-compile) has stage 1
        and 2's elementwise work compiled too."""
        self.model = model
        self.selection = Selection(compiled=True) if model.ops.compiled else EAGER

    def warm_up(self, prefix_sharing: bool) -> None:
        """The first prefill after a prefix (shared, or a prompt's earlier chunks) would JIT-compile FlashInfer's
        prefill kernel (a minute on a fresh host, in the middle of serving): compile it now."""
        if self.device.type == "cuda":
            c = self.cfg
            q = torch.zeros(2, c.num_heads, c.head_dim, device=self.device, dtype=self.dtype)
            kv = torch.zeros(2, c.num_kv_heads, c.head_dim, device=self.device, dtype=self.dtype)
            shared_prefix_attention(q, kv, kv, [0, 2], kv, kv)

    # ---- memory ------------------------------------------------------------------------------------------------
    def layout(
        self,
        gpu_bytes: int,
        host_bytes: int,
        copy_bytes: int | None,
        prefix_caching: bool,
        max_requests: int | None = None,
    ) -> KVLayout:
        """Slots (each running request's windows, at most max_requests), the GPU pools in the proportions of
        long-context requests, the host tier (every layer's exact prompt rows: the S layers' for decode, all of them
        for the prefill chunks and shared prefixes that read them back) and GPU copies of host pages (DeviceCopies),
        which those reads use where a page has one: by default (with prefix caching) the GPU memory that pools for as
        many such requests as the host tier holds leave, at most half of it. With gpu_rows_gib (and a key sketch), that much
        of the GPU budget first holds the rows of resident pages: host-pool pages past the pinned ones, whose rows
        live in the GPU tier alone (DeviceCopies), for requests the host tier has no room for. A shared block is one
        host-tier page: its token rows (and the Q layers' rows), its key-sketch page and the quantized pages of the
        same tokens; kivi (no S layers) shares nothing.
        Generated tokens live in GPU-tier pages of their own, never in shared blocks; a cached partial block is its
        host page, the exact rows of every layer."""
        c, t, item = self.cfg, self.tc, self.dtype.itemsize
        nq, ns, h, d = len(self.q_index), len(self.s_index), c.num_kv_heads, c.head_dim
        vgroup = kivi.value_group(t.group_size, d, t.quant_bits)
        row = OffloadStore.row_bytes(d, item, t.fp8_rows, t.fp8_row_align)
        slot = QuantStore.bytes_per_slot(nq, h, d, t.residual, item) + OffloadStore.bytes_per_slot(
            ns, h, d, t.sink + t.recent, item, t.reuse_rows, row
        )
        slots = int(min(MAX_SLOTS, max_requests or MAX_SLOTS, max(gpu_bytes // 10 // slot, 1)))
        rest = max(gpu_bytes - slots * slot, 0)
        # GPU pools: (page size, bytes per page, pages per 64 host pages of prompt (16k tokens) and their 512 answer
        # tokens (1,024-token answers to 32k prompts: then the host tier, not a GPU pool, bounds the batch), what a
        # request holds)
        gpu: dict[str, tuple[int, int, int, str]] = {}
        if nq:
            gpu["qkv"] = (
                PAGE,
                QuantStore.bytes_per_page(nq, h, d, t.quant_bits, vgroup),
                (64 * HOST_PAGE + 512) // PAGE,
                "all",
            )
        if ns:
            gpu["gen"] = (PAGE, OffloadStore.bytes_per_gen_page(ns, h, d, item), 8, "output")
        if ns and t.key_sketch:
            spage = OffloadStore.bytes_per_sketch_page(ns, h, d, t.key_sketch)
            gpu["sketch"] = (HOST_PAGE, spage, 64, "prompt")
        unit = sum(b * n for _, b, n, _ in gpu.values())  # per 64 host pages
        hpage = OffloadStore.bytes_per_host_page(
            ns,
            h,
            d,
            item,
            channel_copy=not t.key_sketch,
            extra_row_layers=nq,
            fp8_rows=t.fp8_rows,
            fp8_align=t.fp8_row_align,
        )
        host_pages = max(host_bytes // hpage, 1)
        cpage = OffloadStore.bytes_per_copy(ns + nq, h, d, item, t.fp8_rows, t.fp8_row_align)
        # resident pages (gpu_rows_gib): host-pool pages past the pinned ones, their rows in the GPU tier alone, as
        # many as leave the GPU pools room for every request the host pool then holds
        resident = 0
        if ns and t.key_sketch and not self.host_on_device:
            room = max(rest - host_pages * unit // 64, 0) * 64 // (64 * cpage + unit)
            resident = min(int(t.gpu_rows_gib * 2**30) // cpage, room)
            rest -= resident * cpage
        # the host pool's pages: the GPU pools are sized for as many requests
        held = host_pages + resident
        host = [PoolSpec("host", "host", held, HOST_PAGE, hpage, "prompt")]
        if (
            copy_bytes is None
        ):  # without prefix caching only prefill chunks read them: none unless asked
            copy_bytes = (
                0
                if self.host_on_device or not prefix_caching
                else min(rest - held * unit // 64, rest // 2)
            )
        copies = min(max(min(copy_bytes, rest), 0) // cpage, host_pages)
        if copies:
            host.append(PoolSpec("copies", "gpu", copies, HOST_PAGE, cpage))
            rest -= copies * cpage
        if resident:
            host.append(PoolSpec("resident", "gpu", resident, HOST_PAGE, cpage, part_of="host"))
        pools = {
            name: PoolSpec(name, "gpu", max(rest * b * n // unit // b, 1), size, b, holds)
            for name, (size, b, n, holds) in gpu.items()
        }
        sketch = [pools.pop("sketch")] if "sketch" in pools else []
        pools = [PoolSpec("slots", "gpu", slots, 1, slot, "request"), *pools.values()]
        pools += host[:1] + sketch + host[1:]  # a request reserves in this order
        blocks = None
        if prefix_caching and ns:
            shared = {"host": 1, **({"sketch": 1} if "sketch" in gpu else {})}
            blocks = HOST_PAGE, {**shared, **({"qkv": HOST_PAGE // PAGE} if nq else {})}
        return KVLayout(
            pools,
            prefix_blocks=blocks,
            caches_output=False,
            partial_block_pool="host" if blocks else None,
        )

    def prefill_workspace_bytes(self, context: int) -> int:
        """A chunk after a long prefix reads one layer's prefix rows back (K and V of every KV head: read_prefix's
        buffer, the next layer's on the side stream, shared_prefix's reshaped copy): three such buffers."""
        c = self.cfg
        return 3 * context * c.num_kv_heads * 2 * c.head_dim * self.dtype.itemsize

    def allocate_storage(self, specs: list[PoolSpec]) -> None:
        c, t, n = self.cfg, self.tc, {s.name: s.num_pages for s in specs}
        h, d = c.num_kv_heads, c.head_dim
        self.quant = (
            QuantStore(
                len(self.q_index), n.get("qkv", 0), n["slots"], h, d, t, self.device, self.dtype
            )
            if self.q_index
            else None
        )
        self.offload = OffloadStore(
            len(self.s_index),
            n["host"] - n.get("resident", 0),
            n.get("gen", 0),
            n["slots"],
            h,
            d,
            t.sink,
            t.recent,
            self.device,
            self.dtype,
            self.host_on_device,
            t.key_sketch,
            n.get("sketch", 0),
            extra_row_layers=len(self.q_index),
            copy_slots=n.get("copies", 0),
            fp8_rows=t.fp8_rows,
            fp8_align=t.fp8_row_align,
            resident_pages=n.get("resident", 0),
            reuse_rows=t.reuse_rows,
        )
        self.prompt_len: dict[int, int] = {}
        self.q_state: dict[int, QuantState] = {}
        # every request's host pages (and the S layers' windows, generated tokens)
        self.s_state: dict[int, OffloadState] = {}
        # stage 1 of layer l+1 (and a prefill's prefix read) crosses PCIe on a side stream while layer l computes
        self.prefetch_stream = (
            torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        )
        # a captured graph's inputs, per shape: filled in place by every replay of it
        self.graph_views: dict[tuple, DecodeView | QuantView] = {}
        self._k_bounds: dict[tuple[int, int], int] = {}

    def add_request(
        self,
        rid: int,
        pages: dict[str, list[int]],
        prompt_len: int,
        partial_page: int | None = None,
    ) -> None:
        slot = pages["slots"][0]
        self.prompt_len[rid] = prompt_len
        if self.q_index:
            self.q_state[rid] = QuantState(pages.get("qkv", []), slot, self.device, prompt_len)
        self.s_state[rid] = OffloadState(
            pages["host"],
            pages.get("gen", []),
            slot,
            prompt_len,
            self.tc.sink,
            self.tc.recent,
            pages.get("sketch", ()),
            partial_page,
            self.layer_top_k(prompt_len),
        )

    def grow(self, rid: int, pages: dict[str, list[int]]) -> None:
        if pages.get("qkv"):
            self.q_state[rid].grow(pages["qkv"])
        if pages.get("gen"):
            st = self.s_state[rid]
            st.gen_pages_cpu = torch.cat([st.gen_pages_cpu, torch.tensor(pages["gen"])])

    def release(self, rid: int) -> None:
        """Forget the request; its pages' GPU copies go too, but for those of blocks the prefix cache may keep (a
        tailor prompt's blocks once computed; kivi shares nothing)."""
        self.prompt_len.pop(rid, None)
        self.q_state.pop(rid, None)
        st = self.s_state.pop(rid, None)
        if st is not None and (not self.s_index or st.n < st.prompt_len):
            first = st.n // HOST_PAGE if self.s_index else 0
            self.offload.copies.forget(st.host_pages_cpu[first:].tolist())

    # ---- the step ------------------------------------------------------------------------------------------------
    def is_prefill(self, i: int, batch: ForwardBatch) -> bool:
        """Row i computes (a chunk of) its prompt: from its start, after a shared prefix or after earlier chunks."""
        return batch.start[i] < self.prompt_len[batch.rids[i]]

    def prepare(self, batch: ForwardBatch) -> TailorStep:
        decode = [i for i in range(batch.size) if not self.is_prefill(i, batch)]
        step = TailorStep(batch)
        # first: the copies this step's prompts write are planned, then decode rows read only copies that hold
        step.prefill = self._prefill_groups(batch)
        if decode:
            rids = [batch.rids[i] for i in decode]
            step.view, step.qview, _ = self._fill_views(rids, len(decode), static=False)
            step.decode_rows = batch.token_rows(decode, self.device)
        return step

    def _states(self, rids: list[int]) -> tuple[list | None, list | None]:
        """The decode requests' S-layer and Q-layer states (None where the policy has no such layers)."""
        return (
            [self.s_state[rid] for rid in rids] if self.s_index else None,
            [self.q_state[rid] for rid in rids] if self.q_index else None,
        )

    def _sizes(self, states: tuple, static: bool, ahead: int = 0) -> tuple:
        """The views' sizes for the decode requests of `states` (`_states`) once each has `ahead` more tokens: the
        S layers' (host pages, generated tokens), then the Q layers' page width, each there only if the policy has
        such layers; `static`: rounded up to powers of two (at least 64 generated tokens), a captured graph's shape
        key."""

        def size(n: int, least: int = 1) -> int:
            return max(least, 1 << (n - 1).bit_length()) if static else n

        s_states, q_states = states
        key: tuple = ()
        if s_states is not None:
            pages, gen = DecodeView.sizes(s_states)
            key += (size(pages), size(gen + ahead, 64))
        if q_states is not None:
            key += (size(QuantView.pages_of(q_states, ahead)),)
        return key

    def _fill_views(self, rids: list[int], rows: int, static: bool, ahead: int = 0) -> tuple:
        """(DecodeView of the S layers, QuantView of the Q layers, shape key) for the decode requests `rids` in
        `rows` rows: fresh views, or (static) the ones kept per shape as a captured graph's inputs (`_sizes`)."""
        s_states, q_states = states = self._states(rids)
        key = self._sizes(states, static, ahead)
        view = qview = None
        if s_states is not None:
            shape = key[:2]
            view = self._view(
                ("s", rows, *shape),
                static,
                lambda: DecodeView(
                    rows, *shape, self.tc.sink + self.tc.recent, len(self.s_index), self.device
                ),
            )
            view.fill(
                s_states,
                self.offload.scratch_slot,
                self.offload.scratch_gen,
                self.offload.decode_copies,
            )
        if q_states is not None:
            width = key[-1]
            qview = self._view(
                ("q", rows, width),
                static,
                lambda: QuantView(rows, width, self.tc.residual, self.device, self._q_share_rows()),
            )
            qview.fill(q_states, self.tc.residual, self.quant.scratch_page, self.quant.scratch_slot)
        return view, qview, key

    def _q_share_rows(self) -> int:
        """Rows a group of the Q layers' shared pages holds: as many as fill the paged kernel's 16-row query tile
        with their GQA heads (share_q_pages; 1: none)."""
        gqa = self.cfg.num_heads // self.cfg.num_kv_heads
        return max(1, 16 // gqa) if self.tc.share_q_pages else 1

    def _view(self, key: tuple, static: bool, make):
        if not static:
            return make()
        if key not in self.graph_views:
            self.graph_views[key] = make()
        return self.graph_views[key]

    # ---- CUDA-graph decode: every layer inside the graph (static views per shape) --------------------------------
    def graph_attention_layers(self) -> set[int]:
        return set(range(self.cfg.num_layers))

    def graph_key(self, batch: ForwardBatch, ahead: int) -> tuple | None:
        if any(self.is_prefill(i, batch) for i in range(batch.size)):
            return None
        return self._sizes(self._states(batch.rids), True, ahead)

    def prepare_for_graph(
        self, batch: ForwardBatch, rows: int, ahead: int = 0
    ) -> tuple[TailorStep, tuple] | None:
        if any(self.is_prefill(i, batch) for i in range(batch.size)):
            return None  # a prompt: prefill runs eagerly
        view, qview, key = self._fill_views(batch.rids, rows, static=True, ahead=ahead)
        return TailorStep(batch, view=view, qview=qview, decode_rows=slice(0, rows)), key

    def join_streams(self, step: TailorStep) -> None:
        """Make the main stream wait for every side-stream read still in flight (a captured segment must end
        joined)."""
        for key, (*started, ready) in list(step.critical.items()):
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
                step.critical[key] = (*started, None)

    def layer_input(
        self, layer: int, x: torch.Tensor, positions: torch.Tensor, step: TailorStep
    ) -> None:
        """Stage 1 for the next S layer (and for layer 0 itself when it is an S layer): predict its query from
        this layer's normalised input, pick d_s channels per KV head, read them for all prompt tokens. With a key
        sketch nothing is read ahead (stage 1 runs in `attend` with the real query), unless speculative_fetch:
        then both stages and the top-k fetch run ahead with the predicted query."""
        view = step.view
        if view is None or (self.tc.key_sketch and not self.tc.speculative_fetch):
            return
        rows = step.decode_rows
        for t in (0, layer + 1) if layer == 0 else (layer + 1,):
            if t not in self.s_index:
                continue
            q_hat = self.model.layers[t].self_attn.project_q(
                x[rows], positions[rows], self.model.rotary
            )
            si = self.s_index[t]
            if self.tc.speculative_fetch:
                step.critical[t & 1] = self._speculate(si, view, q_hat)
                continue
            channels = self.selection.select_channels(
                q_hat, self.offload.max_abs[si, view.slots], self.tc.d_s
            )
            step.critical[t & 1] = self._prefetch(si, view, channels)

    def _prefetch(self, si: int, view: DecodeView, channels: torch.Tensor) -> tuple:
        side = self.prefetch_stream
        if side is None:
            return channels, self.offload.critical_keys(si, view, channels), None
        b, h, c = channels.shape
        # float32 (what stage 2 scores in), allocated on the main stream, which reads and frees it after waiting for
        # the side stream's write
        keys = torch.empty(
            b,
            h,
            c,
            view.host_pages.shape[1] * HOST_PAGE,
            dtype=torch.float32,
            device=self.device,
        )
        side.wait_stream(
            torch.cuda.current_stream(self.device)
        )  # channels and the page table are ready
        with torch.cuda.stream(side):
            self.offload.critical_keys(si, view, channels, out=keys)
            ready = torch.cuda.Event()
            ready.record(side)
        return channels, keys, ready

    def _speculate(self, si: int, view: DecodeView, q_hat: torch.Tensor) -> tuple:
        """Both stages and the top-k fetch of S layer si with the predicted query q_hat, on the side stream (whose
        tensors the main stream reads only after its event; q_hat stays referenced until then)."""
        side = self.prefetch_stream
        if side is None:
            return *self._fetch(si, q_hat, view), q_hat, None
        side.wait_stream(torch.cuda.current_stream(self.device))  # q_hat and the views are ready
        with torch.cuda.stream(side):
            fetched, valid = self._fetch(si, q_hat, view)
            ready = torch.cuda.Event()
            ready.record(side)
        return fetched, valid, q_hat, ready

    def attend(self, layer, q, k, v, step: TailorStep) -> torch.Tensor:
        rows = step.decode_rows
        if isinstance(rows, slice):  # a decode-only step: its rows are all of q
            return self._decode(layer, q, k, v, step)
        out = torch.empty_like(q)
        batch = step.batch
        for prompts, group in step.prefill:
            if group.reads.pages:
                self._prefill_after_prefix(layer, q, k, v, out, step, prompts, group)
                continue
            for i in prompts:
                sl = batch.seq(i)
                out[sl] = causal_attention(q[sl], k[sl], v[sl], 0)
            self._store_prompt(layer, prompts, k[group.sel], v[group.sel], group, batch)
        if rows is not None:
            out[rows] = self._decode(layer, q[rows], k[rows], v[rows], step)
        return out

    def _decode(self, layer: int, q, k, v, step: TailorStep) -> torch.Tensor:
        """Attention of the decode rows q [B, Hq, D] with their new k, v [B, Hkv, D]: a Q layer's quantized cache
        or an S layer's two stages."""
        if layer in self.q_index:
            qi = self.q_index[layer]
            self.quant.append(qi, step.qview, k, v)
            return self.quant.decode_attention(qi, step.qview, q)
        return self._sparse_decode(layer, q, k, v, step)

    def _prefill_groups(self, batch: ForwardBatch) -> list[tuple[list[int], PrefillGroup]]:
        """This step's prefill rows grouped by the prefix of full blocks they continue (the page_runs of its host
        pages, () for none: shared blocks, a row's own earlier chunks), each group with its PrefillGroup."""
        groups: dict[tuple, list[int]] = {}
        read, written = [], []
        for i, rid in enumerate(batch.rids):
            if not self.is_prefill(i, batch):
                continue
            st, start = self.s_state[rid], batch.start[i]
            p0, p1 = start // HOST_PAGE, -(-batch.total_len(i) // HOST_PAGE)
            pages = st.host_pages_cpu[:p0].tolist()
            groups.setdefault(tuple(page_runs(pages)), []).append(i)
            read += pages + ([st.tail_page(start)] if start % HOST_PAGE else [])
            written += st.host_pages_cpu[p0:p1].tolist()
        self.offload.copies.plan(read, written)  # before any group's reads and writes are laid out
        return [(rows, self._group(rows, runs, batch)) for runs, rows in groups.items()]

    def _prefill_after_prefix(
        self, layer: int, q, k, v, out, step: TailorStep, rows: list[int], group: PrefillGroup
    ) -> None:
        """Rows whose prompts continue one shared prefix (one document, many users) and/or each a cached partial
        block (its tail: a chat's earlier turns): the prefix is read back from the host tier once, each tail with
        it, and every row's new tokens attend to the prefix exactly, in one call for all of them, and causally to
        their tail and themselves. A row stores its tail again with its new tokens, into pages of its own."""
        prefix, tails = self._shared_prefix(layer, rows, group, step)
        sel = group.sel
        ks, vs = k[sel], v[sel]
        if tails is not None:
            ks, vs = (torch.cat([x, t]).index_select(0, group.ext) for x, t in zip((ks, vs), tails))
        pk, pv = prefix[:2] if prefix else (ks[:0], vs[:0])
        out[sel] = shared_prefix_attention(q[sel], ks, vs, group.cu, pk, pv, cu_k=group.cu_k)
        self._store_prompt(layer, rows, ks, vs, group, step.batch, prefix)

    def _shared_prefix(
        self, layer: int, rows: list[int], group: PrefillGroup, step: TailorStep
    ) -> tuple[SharedPrefix | None, tuple | None]:
        """A layer's shared prefix (None for none) and the rows' tails (k, v of every tail page's 256 rows, or None)
        for the prefill rows `rows`, read back from the host tier during the layer before (on CUDA by the side
        stream: DMA copies that overlap that layer's compute); the next layer's read begins now."""
        reads = step.reads
        rows_read, ready = reads.pop((layer, tuple(rows)), None) or self._read_prefix(
            layer, group.reads
        )
        if layer + 1 < self.cfg.num_layers:
            reads[(layer + 1, tuple(rows))] = self._read_prefix(layer + 1, group.reads)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        n = group.prefix_pages
        max_abs = layer in self.s_index and group.prefix_max
        prefix = self.offload.shared_prefix(rows_read[:n], max_abs) if n else None
        tails = (
            self.offload.shared_prefix(rows_read[n:], max_abs=False)[:2]
            if group.ext is not None
            else None
        )
        return prefix, tails

    def _read_prefix(self, layer: int, reads: PrefixReads) -> tuple:
        """Start reading a layer's prefix pages (a shared prefix, tails): (their rows on the device, the event of
        their arrival or None)."""
        if reads.run is not None:  # the copies in place
            return self.offload.read_prefix(self._row_layer(layer), reads), None
        # allocated on the main stream, which uses and frees it only after waiting for the side stream's copy
        out = self.offload.row_buffer(reads.pages)
        side = self.prefetch_stream
        if side is None:
            return self.offload.read_prefix(self._row_layer(layer), reads, out), None
        side.wait_stream(
            torch.cuda.current_stream(self.device)
        )  # `out`'s memory is free of earlier kernels
        with torch.cuda.stream(side):
            self.offload.read_prefix(self._row_layer(layer), reads, out)
            ready = torch.cuda.Event()
            ready.record(side)
        return out, ready

    def _group(self, rows: list[int], runs: tuple, batch: ForwardBatch) -> PrefillGroup:
        """The PrefillGroup of prefill rows `rows` that continue the prefix of host pages `runs` (where their new
        tokens sit in the batch: a slice when contiguous, else an index)."""
        cu = batch.cu
        if all(cu[a + 1] == cu[b] for a, b in zip(rows, rows[1:])):
            sel = slice(cu[rows[0]], cu[rows[-1] + 1])
        else:
            sel = to_device(torch.cat([torch.arange(cu[i], cu[i + 1]) for i in rows]), self.device)
        states = [self.s_state[batch.rids[i]] for i in rows]
        return PrefillGroup.build(
            sel,
            runs,
            [batch.start[i] for i in rows],
            [batch.new[i] for i in rows],
            states,
            [st.tail_page(batch.start[i]) for st, i in zip(states, rows)],
            self.offload.window,
            self.device,
            self.offload.copies,
        )

    def _row_layer(self, layer: int) -> int:
        """Where a layer's prompt rows sit in the host tier: S layers first, then the Q layers' copies."""
        return (
            self.s_index[layer]
            if layer in self.s_index
            else len(self.s_index) + self.q_index[layer]
        )

    def _store_prompt(
        self,
        layer: int,
        rows: list[int],
        k: torch.Tensor,
        v: torch.Tensor,
        group: PrefillGroup,
        batch: ForwardBatch,
        prefix: SharedPrefix | None = None,
    ) -> None:
        """The prompts (or chunks) of prefill rows `rows` from their common start, k, v [sum(group.lens), H, D] row
        after row: the tokens before it (`prefix`) are in shared blocks or earlier chunks, already stored."""
        if layer in self.q_index:
            for i, a, b in zip(rows, group.cu_k, group.cu_k[1:]):
                st = self.q_state[batch.rids[i]]
                self.quant.prefill(
                    self.q_index[layer],
                    st,
                    k[a:b],
                    v[a:b],
                    group.start,
                    prefix and prefix[:2],
                    final=group.start + b - a == st.prompt_len,
                )
        if (
            layer in self.q_index
        ):  # the exact rows too, for later chunks and requests that share this prefix
            self.offload.store_rows(self._row_layer(layer), group.prompt, k, v)
        else:
            self.offload.prefill(self.s_index[layer], group.prompt, k, v, prefix)

    def _sparse_decode(self, layer: int, q, k, v, step: TailorStep) -> torch.Tensor:
        """Stage 2 and exact attention for all decode rows at once: q [B, Hq, D], new k, v [B, Hkv, D]."""
        si, view = self.s_index[layer], step.view
        self.offload.append(si, view, k, v)
        if self.tc.key_sketch and not self.tc.speculative_fetch:
            return self.offload.attend(si, view, q, *self._fetch(si, q, view))
        *started, ready = step.critical.pop(layer & 1)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        if self.tc.speculative_fetch:
            # rows chosen with the predicted query, attended with the real one
            fetched, valid, _ = started
            return self.offload.attend(si, view, q, fetched, valid)
        channels, k_channels = started
        scores = score_tokens(q, k_channels, channels)
        return self.offload.attend(si, view, q, *self._fetch(si, q, view, scores))

    def _fetch(
        self, si: int, q: torch.Tensor, view: DecodeView, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k rows [B, H, k, 2D] of S layer si for query q and which of them count: ranked by `scores`, or
        by the key sketch's (both stages from the GPU tier, d_s channels picked with the real query)."""
        radix = q.shape[0] <= self.tc.radix_topk  # a static shape per captured graph
        maxima = None
        if scores is None:  # the blocks' maxima from the sketch's launch, where the blocks rank
            chunk = 0 if radix else self.tc.topk_chunk
            scores, maxima = self.offload.sketch_token_scores(si, view, q, self.tc.d_s, chunk)
        # one top-k at the largest k of any row (that of the longest context the view holds: a static shape per
        # captured graph), then each row keeps its own k's best (ranks >= its k are masked)
        k = self._k_bound(si, scores.shape[-1])
        idx, valid = self.selection.select_tokens(
            scores,
            view.mid_begin,
            view.mid_end,
            k,
            view.top_k[:, si],
            self.tc.topk_chunk,
            radix,
            0 < self.tc.position_order <= scores.shape[0],
            maxima,
        )
        return self.offload.fetch_rows(si, view, idx, valid), valid

    def _k_bound(self, si: int, context: int) -> int:
        """The top_k of S layer `si` at `context` tokens: at least every shorter request's (k never decreases)."""
        key = (si, context)
        if key not in self._k_bounds:
            self._k_bounds[key] = max(1, self.layer_top_k(context)[si])  # topk of 0 has no rows
        return self._k_bounds[key]

    def finish(self, step: TailorStep) -> None:
        batch = step.batch
        for i, rid in enumerate(batch.rids):
            n = batch.total_len(i)
            if rid in self.q_state:
                self.q_state[rid].advance(n, self.tc.residual)
            if rid in self.s_state:
                self.s_state[rid].n = n


class KiviPolicy(TailorPolicy):
    """`kivi`: the KIVI baseline: every layer quantized (2 bits by default), 128-token full-precision residual."""

    name = "kivi"

    def __init__(self, cfg, device, dtype, tailor_preset: str | None = None, **options):
        self.validate_options(tailor_preset, **options)
        options.setdefault("quant_bits", 2)
        super().__init__(
            cfg,
            device,
            dtype,
            tailor_preset or DEFAULT_PRESET,  # no S layers: no budget to calibrate
            quant_layers=list(range(cfg.num_layers)),
            **options,
        )

    @classmethod
    def validate_options(cls, tailor_preset: str | None = None, **options) -> None:
        if "quant_layers" in options:
            raise ConfigError("kivi quantizes every layer; quant_layers is not an option of it")
        if options.get("host_kv_dtype") not in (None, "auto"):
            raise ConfigError(
                "host_kv_dtype: kivi keeps no layer's KV in the host tier for decode (tailor does)"
            )
        super().validate_options(tailor_preset, **{"quant_bits": 2, **options})
