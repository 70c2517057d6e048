"""`full`: every layer's K/V in full precision in paged GPU memory — the SGLang/vLLM baseline. The decode-time
baselines (offload, streaming, quest) reuse its paged storage and change where it lives or what a decode
step reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..kernels import flashinfer_decode, host_copy
from ..kernels.attention import (
    PagedPrefill,
    SharedPrefixDecode,
    causal_attention,
    grouped_attention,
)
from ..memory.host_memory import host_tensor
from ..memory.layout import KVLayout
from ..memory.pages import PoolSpec
from .batch import ForwardBatch, StepState
from .policy import KVPolicy

PAGE_SIZE = 16
# decode rows that begin with this many common pages (512 tokens) read them as a group
MIN_SHARED_PAGES = 32


def shared_groups(tables: list[torch.Tensor], counts: list[int]) -> list[tuple[list[int], int]]:
    """Groups of two or more decode rows (indices) whose page tables (CPU) begin with the same pages, with
    how many they share: at least MIN_SHARED_PAGES, each row keeping its last page (the one its new token is in) of
    its own. From the page ids alone: rows share pages only where the prefix cache gave them the same blocks."""
    by_first: dict[int, list[int]] = {}
    for i, (t, c) in enumerate(zip(tables, counts)):
        if c > MIN_SHARED_PAGES:
            by_first.setdefault(int(t[0]), []).append(i)
    groups = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        m = min(counts[i] for i in rows) - 1  # each row keeps its last page
        pt = torch.stack([tables[i][:m] for i in rows])
        n = int((pt == pt[0]).all(0).int().cumprod(0).sum())
        if n >= MIN_SHARED_PAGES:
            groups.append((rows, n))
    return groups


def as_pages(kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V token slots [N, Hkv, D] as pages [N / PAGE_SIZE, PAGE_SIZE, Hkv, D]."""
    return kc.view(-1, PAGE_SIZE, *kc.shape[1:]), vc.view(-1, PAGE_SIZE, *vc.shape[1:])


@dataclass
class FullStep(StepState):
    """What `prepare` computes for the layers of one step:
    - write [T]: the token slots of the step's new tokens;
    - prompt_reads: per row computing prompt tokens, the slots it attends to causally (the host tier's);
    - decode_rows [B]: the decode rows' tokens in the batch (a slice when they are all of it; None: no decode row);
    - prompt_rows: in the gpu tier, where the prompt rows' tokens sit in the batch (they attend to their pages in
      place: FlashInfer's paged prefill on CUDA, attention.PagedPrefill on CPU);
    - staged: the offload baseline's decode pages, in order, staged into GPU memory every layer;
    - decode_slots, decode_mask [B, R]: without FlashInfer, the slots each decode row reads, padded;
    - cascade: decode rows that share a document's pages read them once per group (SharedPrefixDecode)."""

    write: torch.Tensor
    prompt_reads: dict[int, torch.Tensor]
    decode_rows: torch.Tensor | slice | None = None
    prompt_rows: torch.Tensor | None = None
    staged: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    cascade: bool = False


class FullPolicy(KVPolicy):
    name = "full"
    tier = "gpu"  # where the pages live
    reads_everything = (
        True  # decode rows attend to every cached token (FlashInfer's paged decode on CUDA)
    )

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype, cascade: int = 1, **options):
        """`cascade` 0: decode rows that share a document's pages read them each on their own."""
        super().__init__(cfg, device, dtype, **options)
        self.use_cascade = bool(cascade)

    @classmethod
    def validate_options(cls, **options) -> None:
        if "cascade" in options and not (cls.reads_everything and cls.tier == "gpu"):
            raise ConfigError(
                f"cascade: kv_policy {cls.name!r} reads no shared pages in decode (full does)"
            )
        if options.get("cascade", 1) not in (0, 1):
            raise ConfigError(f"cascade must be 0 or 1, got {options['cascade']!r}")
        options.pop("cascade", None)
        super().validate_options(**options)

    def layout(
        self,
        gpu_bytes: int,
        host_bytes: int,
        copy_bytes: int | None,
        prefix_caching: bool,
        max_requests: int | None = None,
    ) -> KVLayout:
        """One pool of PAGE_SIZE-token pages of every layer's K/V, in this policy's tier; a block is one page."""
        c = self.cfg
        bpp = 2 * c.num_layers * PAGE_SIZE * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        pages = max((gpu_bytes if self.tier == "gpu" else host_bytes) // bpp, 1)
        return KVLayout(
            [PoolSpec("kv", self.tier, pages, PAGE_SIZE, bpp, holds="all")],
            prefix_blocks=(PAGE_SIZE, {"kv": 1}) if prefix_caching else None,
        )

    def allocate_storage(self, specs: list[PoolSpec]) -> None:
        c, n = self.cfg, specs[0].num_pages
        shape = (c.num_layers, n * PAGE_SIZE, c.num_kv_heads, c.head_dim)
        if self.tier == "host":
            self.k_cache, self.v_cache = (
                host_tensor(shape, self.dtype, self.device.type == "cuda") for _ in "kv"
            )
        else:
            self.k_cache, self.v_cache = (
                torch.empty(shape, dtype=self.dtype, device=self.device) for _ in "kv"
            )
        self.page_tables: dict[int, torch.Tensor] = {}
        self.page_tables_cpu: dict[
            int, torch.Tensor
        ] = {}  # the same on the CPU: sharing is found there
        self.prompt_lens: dict[int, int] = {}
        c = self.cfg
        fast = flashinfer_decode.available(self.device, self.dtype, c.head_dim)
        shape = (self.device, c.num_heads, c.num_kv_heads, c.head_dim, PAGE_SIZE, self.dtype)
        self.flash = (
            flashinfer_decode.PagedDecode(*shape) if self.reads_everything and fast else None
        )
        self.cascade = None
        if self.reads_everything and self.tier == "gpu" and self.use_cascade:
            shared = flashinfer_decode.SharedPrefixDecode if fast else SharedPrefixDecode
            self.cascade = shared(*shape)
        self.copy = host_copy.ops(self.device)
        self.prefill = None  # the gpu tier's prompt rows attend to their pages in place
        if self.tier == "gpu":
            paged = PagedPrefill
            if fast:
                from ..kernels.flashinfer_prefill import PagedPrefill as paged
            self.prefill = paged(self.device, c.num_heads, c.num_kv_heads, c.head_dim)

    def warm_up(self, prefix_sharing: bool) -> None:
        """FlashInfer's paged prefill and the cascade's pass over shared pages JIT-compile on first use: compile them
        now (a chunk of each size that takes its own backend, over page 0; two rows sharing a page)."""
        if self.prefill is None or self.device.type != "cuda":
            return
        c, page = self.cfg, torch.zeros(1, dtype=torch.long, device=self.device)
        kp, vp = as_pages(self.k_cache[0], self.v_cache[0])
        for n in self.prefill.warm_up_sizes():
            pages = torch.zeros(-(-n // PAGE_SIZE), dtype=torch.long, device=self.device)
            self.prefill.plan([pages], [n], [n], PAGE_SIZE, self.dtype)
            q = torch.zeros(n, c.num_heads, c.head_dim, device=self.device, dtype=self.dtype)
            self.prefill.run(q, kp, vp)
        q = torch.zeros(2, c.num_heads, c.head_dim, device=self.device, dtype=self.dtype)
        if self.cascade is not None:
            self.cascade.plan([([0, 1], page)], [page, page], [1, 1])
            self.cascade.run(q, kp, vp)

    def add_request(
        self,
        rid: int,
        pages: dict[str, list[int]],
        prompt_len: int,
        partial_page: int | None = None,
    ) -> None:
        self.page_tables_cpu[rid] = torch.tensor(pages["kv"], dtype=torch.long)
        self.page_tables[rid] = self.page_tables_cpu[rid].to(self.k_cache.device)
        self.prompt_lens[rid] = prompt_len

    def grow(self, rid: int, pages: dict[str, list[int]]) -> None:
        more = torch.tensor(pages.get("kv", []), dtype=torch.long)
        self.page_tables_cpu[rid] = torch.cat([self.page_tables_cpu[rid], more])
        self.page_tables[rid] = torch.cat([self.page_tables[rid], more.to(self.k_cache.device)])

    def release(self, rid: int) -> None:
        self.page_tables.pop(rid, None)
        self.page_tables_cpu.pop(rid, None)
        self.prompt_lens.pop(rid, None)

    def is_decode(self, i: int, batch: ForwardBatch) -> bool:
        """Row i computes a generated token. Only those rows are narrowed by the baselines: a prompt token gets
        exact causal attention even when it is computed alone after a cached prefix or an earlier chunk."""
        return batch.start[i] >= self.prompt_lens[batch.rids[i]]

    def slots(self, rid: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat token slots of `positions` of request `rid`."""
        return self.page_tables[rid][positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE

    def read_positions(self, i: int, batch: ForwardBatch) -> torch.Tensor:
        """Cached positions sequence i attends to in this step (all of them; baselines narrow decode rows)."""
        return torch.arange(batch.total_len(i))

    def prepare(self, batch: ForwardBatch) -> FullStep:
        dev = self.k_cache.device
        write = torch.cat(
            [
                self.slots(r, torch.arange(s, s + n, device=dev))
                for r, s, n in zip(batch.rids, batch.start, batch.new)
            ]
        )
        decode = [i for i in range(batch.size) if self.is_decode(i, batch)]
        prompt = [i for i in range(batch.size) if i not in decode]
        read = {
            i: self.slots(batch.rids[i], self.read_positions(i, batch).to(dev))
            for i in range(batch.size)
            if (i in prompt and self.prefill is None) or (i in decode and self.flash is None)
        }
        step = FullStep(batch, write, {i: s for i, s in read.items() if i not in decode})
        if prompt and self.prefill is not None:
            lengths = [batch.total_len(i) for i in prompt]
            self.prefill.plan(
                [self.page_tables[batch.rids[i]] for i in prompt],
                lengths,
                [batch.new[i] for i in prompt],
                PAGE_SIZE,
                self.dtype,
            )
            # gathered even when they are all of q, and copied synchronously: this copy kept the host behind the
            # stream, which hid FlashInfer's prefill plans overwriting their page-locked buffer before its copy ran
            # (an H100 faulted once c6d78aa skipped it; the plans now wait, PinnedPlan). Copying it through pinned
            # memory is the next GPU check (NOTES)
            rows = [torch.arange(batch.cu[i], batch.cu[i + 1]) for i in prompt]
            step.prompt_rows = torch.cat(rows).to(self.device)
        if not decode:
            return step
        step.decode_rows = batch.token_rows(decode, self.device)
        if self.cascade is not None and self._plan_cascade(decode, batch):
            step.cascade = True
        elif self.flash is not None:
            lengths = [batch.total_len(i) for i in decode]
            pages = [
                self.page_tables[batch.rids[i]][: -(-n // PAGE_SIZE)]
                for i, n in zip(decode, lengths)
            ]
            if (
                self.tier == "host"
            ):  # the offload baseline brings every page of the decode rows over PCIe each layer
                step.staged = torch.cat(pages).to(self.device)
                pages = list(
                    torch.arange(step.staged.numel(), device=self.device).split(
                        [p.numel() for p in pages]
                    )
                )
            self.flash.plan(pages, lengths)
        else:  # all decode rows read at once: slots padded to the longest, with a mask
            reads = [read[i] for i in decode]
            n = max(r.numel() for r in reads)
            step.decode_slots = torch.stack(
                [torch.nn.functional.pad(r, (0, n - r.numel())) for r in reads]
            )
            step.decode_mask = (
                torch.arange(n, device=dev)
                < torch.tensor([r.numel() for r in reads], device=dev)[:, None]
            ).to(self.device)
        return step

    def attend(self, layer, q, k, v, step: FullStep) -> torch.Tensor:
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[step.write] = k.to(kc.device)
        vc[step.write] = v.to(vc.device)
        rows = step.decode_rows
        if isinstance(rows, slice):  # a decode-only step: its rows are all of q
            return self._decode(q, kc, vc, step)
        out = torch.empty_like(q)
        batch = step.batch
        for i, slots in step.prompt_reads.items():
            sl = batch.seq(i)
            out[sl] = causal_attention(
                q[sl], kc[slots].to(q.device), vc[slots].to(q.device), batch.start[i]
            )
        if step.prompt_rows is not None:
            out[step.prompt_rows] = self.prefill.run(q[step.prompt_rows], *as_pages(kc, vc))
        if rows is not None:
            out[rows] = self._decode(q[rows], kc, vc, step)
        return out

    def _decode(self, q, kc, vc, step: FullStep) -> torch.Tensor:
        """Attention of the decode rows q [B, Hq, D] over this layer's cache kc, vc (their new tokens written)."""
        kp, vp = as_pages(kc, vc)
        if step.cascade:
            return self.cascade.run(q, kp, vp)
        if self.flash is not None:
            if self.tier == "host":
                kp, vp = self._stage(kp, step.staged), self._stage(vp, step.staged)
            return self.flash.run(q, kp, vp)
        # on CPU the offload baseline's fetch is this .to(device): every cached token crosses PCIe each step
        keys = kc[step.decode_slots].to(q.device).transpose(1, 2)  # [B, H, R, D]
        values = vc[step.decode_slots].to(q.device).transpose(1, 2)
        return self.decode(q, keys, values, step.decode_mask)

    def _plan_cascade(self, decode: list[int], batch: ForwardBatch) -> bool:
        """Plan the decode rows (batch indices) as SharedPrefixDecode groups where some share a document's pages
        (False: none do)."""
        rids = [batch.rids[i] for i in decode]
        lengths = [batch.total_len(i) for i in decode]
        counts = [-(-n // PAGE_SIZE) for n in lengths]
        groups = shared_groups([self.page_tables_cpu[r] for r in rids], counts)
        if not groups:
            return False
        shared = [0] * len(rids)
        for rows, n in groups:
            for i in rows:
                shared[i] = n
        self.cascade.plan(
            [(rows, self.page_tables[rids[rows[0]]][:n]) for rows, n in groups],
            [self.page_tables[r][s:c] for r, s, c in zip(rids, shared, counts)],
            [n - s * PAGE_SIZE for n, s in zip(lengths, shared)],
        )
        return True

    def _stage(self, host_pages: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Pages `pages` of one layer (the decode rows'), read from pinned host memory by a UVA kernel into GPU
        memory."""
        staged = torch.empty(
            pages.numel(), *host_pages.shape[1:], dtype=host_pages.dtype, device=self.device
        )
        self.copy.copy_pages(
            host_pages, pages, staged, torch.arange(staged.shape[0], device=self.device)
        )
        return staged

    def decode(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Decode rows q [B, Hq, D] over the keys read for them, [B, H, R, D] with mask [B, R]."""
        return grouped_attention(q, keys, values, mask=mask[:, None].expand(-1, keys.shape[1], -1))
