"""KV storage of TailorKV's sparsity-friendly ("S") layers: the prompt's full-precision K/V in the host tier,
sink + recent prompt tokens, max|K| and every generated token in the GPU tier.

Host layout per layer and 256-token page: token rows [256, H, 2D] with a token's K and V of one KV head side by
side (what the top-k fetch reads: one 512-B row at D=128; token-major, so that a prefix read back is a strided
view [tokens, H, D] of K and of V for the prefill kernels, not a copy), and a channel-major copy of K [H, D, 256]
(what stage 1 reads: 512-B runs at bf16, which cross PCIe at ~49 GB/s where 128-B runs reach 15). On CUDA the host
tensors are pinned and the moves (host_copy) are GPU kernels reading and writing them through UVA, except the
bulk read of a shared prefix, which is DMA copies that overlap compute (or, for pages with a copy in the GPU tier,
DeviceCopies, a gather there); generated tokens sit in the GPU tier in 64-token pages.

With a key sketch (TailorConfig.key_sketch) the channel-major copy is not kept: a KIVI 1/2-bit copy of K per
256-token page in the GPU tier (its own pool, "sketch" pages) is what stage 2 scores from.

With fp8 rows (--host-kv-dtype fp8) the token rows (and their GPU copies) hold host_fp8's packed rows: decode
fetches them in 8 bits and the sparse attention kernel dequantizes them; prompt-time reads (shared_prefix) dequantize
to the compute dtype. The channel-major copy of K stays in the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels import (
    channel_select,
    host_copy,
    host_fp8,
    kivi,
    kv_append,
    sketch_scores,
    sparse_attention,
)
from ..memory.device_copies import DeviceCopies, PrefixReads
from ..memory.host_memory import host_tensor
from .prompt_rows import HOST_PAGE, PromptRows
from .staging import StagedInputs

PAGE = 64  # tokens per generated-token page


def abs_max(k: torch.Tensor) -> torch.Tensor:
    """max|k| over the tokens (dim 0), in float32: one pass, no |k| copy; exact in any dtype."""
    low, high = torch.aminmax(k, dim=0)
    return torch.maximum(high, -low).float()


class SharedPrefix(NamedTuple):
    """A cached prompt prefix of one layer read back to the GPU for the rows that prefill after it: k, v [P, H, D]
    and (S layers) max|K| per channel [H, D], float32."""

    k: torch.Tensor
    v: torch.Tensor
    max_abs: torch.Tensor | None


def page_runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive page numbers: (first page, its index in `pages`, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(pages):
        if runs and runs[-1][0] + runs[-1][2] == p:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((p, i, 1))
    return runs


class OffloadState:
    def __init__(
        self,
        host_pages: list[int],
        gen_pages: list[int],
        slot: int,
        prompt_len: int,
        sink: int,
        recent: int,
        sketch_pages: list[int] = (),
        partial_page: int | None = None,
        top_k: list[int] = (),
    ):
        # per S layer: tokens fetched per step (fixed at admission by the prompt's length)
        self.top_k_cpu = torch.tensor(top_k, dtype=torch.long)
        self.host_pages_cpu = torch.tensor(host_pages, dtype=torch.long)
        self.sketch_pages_cpu = torch.tensor(sketch_pages, dtype=torch.long)
        self.gen_pages_cpu = torch.tensor(gen_pages, dtype=torch.long)
        self.slot, self.prompt_len = slot, prompt_len
        self.partial_page = (
            partial_page  # the host page of the cached partial block its prompt continues
        )
        self.n_sink = min(sink, prompt_len)
        self.recent_begin = max(
            self.n_sink, prompt_len - recent
        )  # recent window: [recent_begin, prompt_len)
        self.n = 0  # tokens computed (and cached)

    def tail_page(self, start: int) -> int:
        """The host page of the prompt's tokens [start - start % 256, start), which a chunk from `start` computes
        after: the cached partial block's before the request computed any, then its own."""
        return self.partial_page if self.n == 0 else int(self.host_pages_cpu[start // HOST_PAGE])

    @property
    def window_len(self) -> int:
        return self.n_sink + self.prompt_len - self.recent_begin

    def gen_slots(self) -> torch.Tensor:
        """GPU-tier slots (CPU tensor) of every generated position up to this step's token, which is the last."""
        pos = torch.arange(0, self.n + 1 - self.prompt_len)
        return self.gen_pages_cpu[pos // PAGE] * PAGE + pos % PAGE


class DecodeView:
    """The decode rows of one step in batch tensors, read by every S layer: built once per step, or kept as the
    static inputs of a captured CUDA graph and refilled each step. Padding (rows past the step's requests, page-table
    entries past a row's pages, generated slots past a row's tokens) points at nothing: page -1, the scratch window
    slot and generated-token slot, masks False."""

    def __init__(self, rows: int, pages: int, gen: int, window: int, layers: int, device):
        i64, b = torch.long, torch.bool
        self.staged = StagedInputs(
            {
                "slots": ((rows,), i64),
                "host_pages": ((rows, pages), i64),
                "copy_slots": ((rows, pages), i64),
                "sketch_pages": ((rows, pages), i64),
                "mid_begin": ((rows,), i64),
                "mid_end": ((rows,), i64),
                "win_mask": ((rows, window), b),
                "gen_write": ((rows,), i64),
                "gen_read": ((rows, gen), i64),
                "gen_mask": ((rows, gen), b),
                "top_k": ((rows, layers), i64),
            },
            device,
        )
        self.__dict__.update(self.staged.device)

    @staticmethod
    def sizes(states: list[OffloadState]) -> tuple[int, int]:
        """(host pages, generated tokens) of the longest rows, this step's token included."""
        return max(st.host_pages_cpu.numel() for st in states), max(
            st.n + 1 - st.prompt_len for st in states
        )

    def fill(
        self,
        states: list[OffloadState],
        scratch_slot: int,
        scratch_gen: int,
        copies: DeviceCopies | None = None,
    ) -> None:
        """The step's rows; `copies`: the pages' GPU copies, which the top-k fetch reads instead of the host."""
        h = self.staged.host()
        rows, n = h["slots"].shape[0], len(states)
        h["slots"].fill_(scratch_slot)
        h["host_pages"].fill_(-1)
        h["copy_slots"].fill_(-1)
        h["sketch_pages"].fill_(-1)
        h["gen_read"].fill_(scratch_gen)
        h["top_k"].zero_()
        lens = torch.ones(2, rows, dtype=torch.long)  # window, generated
        mid = torch.zeros(2, rows, dtype=torch.long)
        if n:
            h["slots"][:n] = torch.tensor([st.slot for st in states])
            mid[:, :n] = torch.tensor(
                [[st.n_sink for st in states], [st.recent_begin for st in states]]
            )
            lens[:, :n] = torch.tensor(
                [[st.window_len for st in states], [st.n + 1 - st.prompt_len for st in states]]
            )
        for i, st in enumerate(states):
            pages = st.host_pages_cpu
            h["host_pages"][i, : pages.numel()] = (
                pages if copies is None else copies.host_index(pages)
            )
            if copies is not None:
                h["copy_slots"][i, : pages.numel()] = copies.readable(pages)
            h["sketch_pages"][i, : st.sketch_pages_cpu.numel()] = st.sketch_pages_cpu
            h["top_k"][i, : st.top_k_cpu.numel()] = st.top_k_cpu
            g = st.gen_slots()
            h["gen_read"][i, : g.numel()] = g
        h["mid_begin"].copy_(mid[0])
        h["mid_end"].copy_(mid[1])
        h["win_mask"].copy_(torch.arange(h["win_mask"].shape[1]) < lens[0, :, None])
        h["gen_write"].copy_(h["gen_read"].gather(1, (lens[1] - 1)[:, None])[:, 0])
        h["gen_mask"].copy_(torch.arange(h["gen_read"].shape[1]) < lens[1, :, None])
        self.staged.send()


class OffloadStore:
    def __init__(
        self,
        num_layers: int,
        host_pages: int,
        gen_pages: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        sink: int,
        recent: int,
        device,
        dtype,
        host_on_device: bool = False,
        sketch_bits: int = 0,
        sketch_pages: int = 0,
        extra_row_layers: int = 0,
        copy_slots: int = 0,
        fp8_rows: bool = False,
        fp8_align: int = 4,
        resident_pages: int = 0,
        reuse_rows: int = 0,
    ):
        """`extra_row_layers`: more layers whose prompt rows only are kept (tailor's Q layers, for a later request
        that shares the prompt's prefix and must attend to it exactly at prefill): row layers num_layers, ...
        `copy_slots`: host pages whose token rows (every row layer) also have a copy in the GPU tier (DeviceCopies).
        `resident_pages`: more pages after the `host_pages` pinned ones, their rows in the GPU tier alone (with a key
        sketch: stage 1 reads no host rows of them); the host tier gets a scratch page that their reads index and that
        nothing writes.
        `fp8_rows`: token rows stored as host_fp8 packed rows, padded to a multiple of `fp8_align` bytes.
        `reuse_rows`: per slot, layer and KV head, the first that many rows its last decode step fetched, kept on the
        GPU with their positions: the next step reads those it selects again there (the same bytes)."""
        L, H, D = num_layers, num_kv_heads, head_dim
        self.dtype, self.fp8_rows, self.fp8_align = dtype, fp8_rows, fp8_align
        # token-major pages [256 tokens, H, k|v]: a prefix read back is a view for the prefill kernels (no copy)
        self.row_shape = (HOST_PAGE, H, host_fp8.row_width(D, fp8_align) if fp8_rows else 2 * D)
        self.row_dtype = torch.uint8 if fp8_rows else dtype
        self.sketch_bits = sketch_bits
        self.h, self.d, self.device, self.window = H, D, device, sink + recent
        # host_on_device: the "host" tier in device memory — the same math without PCIe (accuracy runs)
        pin = torch.device(device).type == "cuda" and not host_on_device

        def host(*shape, dtype=dtype):
            return (
                torch.empty(shape, dtype=dtype, device=device)
                if host_on_device
                else host_tensor(shape, dtype, pin)
            )

        assert sketch_bits or not resident_pages, "resident pages need a key sketch"
        self.rows = [
            host(host_pages + (resident_pages > 0), *self.row_shape, dtype=self.row_dtype)
            for _ in range(L + extra_row_layers)
        ]  # no huge block
        self.copies = DeviceCopies(copy_slots, host_pages, resident_pages)
        self.copy_rows = (
            torch.empty(
                L + extra_row_layers,
                copy_slots + resident_pages + 1,
                *self.row_shape,
                dtype=self.row_dtype,
                device=device,
            )
            if copy_slots or resident_pages
            else None
        )
        # the channel-major copy of K that stage 1 reads, unless the sketch replaces it
        self.k_t = None if sketch_bits else [host(host_pages, H, D, HOST_PAGE) for _ in range(L)]
        self.ops, self.attn_ops = host_copy.ops(device), sparse_attention.ops(device)
        self.append_ops = kv_append.ops(device)
        if sketch_bits:
            self.kivi_ops, self.sketch_ops = kivi.ops(device), sketch_scores.ops(device)
            self.channel_ops = channel_select.ops(device)
            words, groups = HOST_PAGE * sketch_bits // 32, HOST_PAGE // sketch_scores.GROUP
            # channel-major pages (sketch_scores.py): a row reads only the words of the channels it scores
            self.sk_packed = torch.zeros(
                L, sketch_pages, H, D, words, device=device, dtype=torch.int32
            )
            self.sk_scale = torch.zeros(
                L, sketch_pages, H, D, groups, device=device, dtype=torch.float16
            )
            self.sk_zero = torch.zeros(
                L, sketch_pages, H, D, groups, device=device, dtype=torch.float16
            )
        dev = dict(device=device, dtype=dtype)
        # one more window slot and generated-token page than the pools hand out: the scratch that padding rows of
        # a captured decode step point at (zeros, so their attention stays finite)
        self.scratch_slot, self.scratch_gen = num_slots, gen_pages * PAGE
        self.win_k = torch.zeros(L, num_slots + 1, sink + recent, H, D, **dev)
        self.win_v = torch.zeros(L, num_slots + 1, sink + recent, H, D, **dev)
        self.max_abs = torch.zeros(L, num_slots + 1, H, D, device=device, dtype=torch.float32)
        self.gen_k = torch.zeros(L, (gen_pages + 1) * PAGE, H, D, **dev)
        self.gen_v = torch.zeros(L, (gen_pages + 1) * PAGE, H, D, **dev)
        self.kept_pos = self.kept_rows = None
        if reuse_rows:  # positions -1: nothing kept
            self.kept_pos = torch.full(
                (L, num_slots + 1, H, reuse_rows), -1, device=device, dtype=torch.long
            )
            self.kept_rows = torch.zeros(
                L,
                num_slots + 1,
                H,
                reuse_rows,
                self.row_shape[-1],
                device=device,
                dtype=self.row_dtype,
            )

    @staticmethod
    def bytes_per_host_page(
        num_layers: int,
        h: int,
        d: int,
        itemsize: int,
        channel_copy: bool = True,
        extra_row_layers: int = 0,
        fp8_rows: bool = False,
        fp8_align: int = 4,
    ) -> int:
        rows = (num_layers + extra_row_layers) * OffloadStore.row_bytes(
            d, itemsize, fp8_rows, fp8_align
        )
        channel_major = num_layers * d * itemsize if channel_copy else 0
        return (rows + channel_major) * h * HOST_PAGE

    @staticmethod
    def row_bytes(d: int, itemsize: int, fp8_rows: bool, fp8_align: int = 4) -> int:
        """Bytes of one token's row of one KV head (K and V)."""
        return host_fp8.row_width(d, fp8_align) if fp8_rows else 2 * d * itemsize

    @staticmethod
    def bytes_per_copy(
        row_layers: int, h: int, d: int, itemsize: int, fp8_rows: bool = False, fp8_align: int = 4
    ) -> int:
        """GPU bytes of one host page's copy (DeviceCopies): its token rows of every row layer."""
        return row_layers * h * HOST_PAGE * OffloadStore.row_bytes(d, itemsize, fp8_rows, fp8_align)

    @staticmethod
    def bytes_per_sketch_page(num_layers: int, h: int, d: int, bits: int) -> int:
        return (
            num_layers * h * d * (HOST_PAGE * bits // 8 + 2 * 2 * HOST_PAGE // sketch_scores.GROUP)
        )

    @staticmethod
    def bytes_per_gen_page(num_layers: int, h: int, d: int, itemsize: int) -> int:
        return num_layers * PAGE * 2 * h * d * itemsize

    @staticmethod
    def bytes_per_slot(
        num_layers: int,
        h: int,
        d: int,
        window: int,
        itemsize: int,
        reuse_rows: int = 0,
        row: int = 0,
    ) -> int:
        """A slot's window, max|K| and (reuse_rows) the rows of `row` bytes its last fetch kept, with positions."""
        return num_layers * (2 * window * h * d * itemsize + h * d * 4 + reuse_rows * h * (row + 8))

    def prefill(
        self,
        layer: int,
        rows: PromptRows,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix: SharedPrefix | None = None,
    ) -> None:
        """Store the prompts (or chunks of them) of prefill rows from their common start (a multiple of 256; the
        `prefix` before it is stored, read back): their new k, v [T, H, D] of an S layer to the host tier and the
        sketch, max|K| per channel so far (a running max over a row's chunks) and, with a row's last chunk, its
        sink + recent window on the GPU."""
        kp = self.store_rows(layer, rows, k, v)
        if self.kept_pos is not None:  # a slot's rows kept are an earlier request's
            self.kept_pos[layer, rows.slots] = -1
        if self.sketch_bits:
            self._sketch(layer, rows, kp)
        else:
            src = torch.arange(kp.shape[0], device=k.device)
            self.ops.copy_pages(
                kp.transpose(2, 3).contiguous(), src, self.k_t[layer], rows.host_pages
            )
        n_rows, window = rows.slots.numel(), self.win_k.shape[2]
        for dst, before, after in (
            (self.win_k, prefix and prefix.k, k),
            (self.win_v, prefix and prefix.v, v),
        ):
            win = after[rows.win_new]
            if before is not None:
                win = torch.where(rows.win_from_pre[..., None, None], before[rows.win_pre], win)
            dst[layer, rows.win_slots] = win.view(n_rows, window, self.h, self.d)
        max_abs = torch.stack([abs_max(k[a:b]) for a, b in zip(rows.cu, rows.cu[1:])])
        if prefix is not None and prefix.max_abs is not None:
            max_abs = torch.maximum(max_abs, prefix.max_abs)
        held = self.max_abs[layer, rows.slots]
        self.max_abs[layer, rows.slots] = torch.where(
            rows.continues[:, None, None], torch.maximum(max_abs, held), max_abs
        )

    def store_rows(
        self, row_layer: int, rows: PromptRows, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Prefill rows' token rows k, v [T, H, D] into their host pages from their start (a multiple of 256);
        returns the keys stored, as pages [P, H, 256, D] (a view)."""
        np_ = rows.host_pages.numel()
        kv = torch.cat([k, v], dim=-1)[rows.page_src].view(np_, *self.row_shape[:2], 2 * self.d)
        kp, src = kv[..., : self.d].transpose(1, 2), torch.arange(np_, device=k.device)
        if self.fp8_rows:
            kv = host_fp8.quantize_rows(kv, self.fp8_align)
        self.ops.copy_pages(kv, src, self.rows[row_layer], rows.host_pages)
        if self.copy_rows is not None:
            self.copy_rows[row_layer][rows.copy_slots] = kv
        return kp

    def row_buffer(self, pages: int) -> torch.Tensor:
        """An uninitialised device buffer for `pages` pages of token rows as stored (read_prefix's `out`)."""
        return torch.empty(pages, *self.row_shape, dtype=self.row_dtype, device=self.device)

    def read_prefix(
        self, row_layer: int, reads: PrefixReads, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The token rows of a shared prefix into `out` [pages, 256, H, 2D] on the device: the pages with a copy
        from the GPU tier, the others one copy per run of consecutive host pages (on CUDA DMA copies by the copy
        engines, which leave the SMs to the compute they overlap). Pages whose copies are one run of slots are
        those copies (a view; `out` is not needed)."""
        if reads.run is not None:
            return self.copy_rows[row_layer][reads.run : reads.run + reads.pages]
        src = self.rows[row_layer]
        for page, at, count in reads.host_runs:
            out[at : at + count].copy_(src[page : page + count], non_blocking=True)
        if reads.at is None:
            return out
        if not reads.host_runs:  # all from copies, in order: one gather
            return torch.index_select(self.copy_rows[row_layer], 0, reads.slots, out=out)
        out[reads.at] = self.copy_rows[row_layer][reads.slots]
        return out

    def shared_prefix(self, rows: torch.Tensor, max_abs: bool) -> SharedPrefix:
        """The k, v of prefix rows read back by read_prefix (fp8 rows dequantized), with max|K| when asked: views of
        the rows, token after token (strided, as FlashInfer's prefill reads them)."""
        if self.fp8_rows:
            rows = host_fp8.dequantize_rows(rows, self.dtype, self.d)
        kv = rows.view(rows.shape[0] * HOST_PAGE, self.h, 2 * self.d)
        k, v = kv[..., : self.d], kv[..., self.d :]
        if not max_abs:
            return SharedPrefix(k, v, None)
        return SharedPrefix(k, v, abs_max(k))

    def _sketch(self, layer: int, rows: PromptRows, kp: torch.Tensor) -> None:
        """Quantize the keys of host pages kp [P, H, 256, D] per channel (groups of 64 tokens) into their sketch
        pages."""
        np_ = kp.shape[0]
        q = self.kivi_ops.quantize_keys(
            kp.reshape(np_ * self.h, HOST_PAGE, self.d), self.sketch_bits, sketch_scores.GROUP
        )
        for src, dst in zip(q, (self.sk_packed, self.sk_scale, self.sk_zero)):
            dst[layer, rows.sketch_pages] = src.view(np_, self.h, -1, self.d).transpose(-1, -2)

    def append(self, layer: int, view: DecodeView, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store each decode row's new k, v [B, H, D] among its generated tokens."""
        self.append_ops.append_kv(self.gen_k[layer], self.gen_v[layer], view.gen_write, k, v)

    def critical_keys(
        self, layer: int, view: DecodeView, channels: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stage-1 read: channels [B, H, d_s] of K for every prompt token -> [B, H, d_s, pages*256] on the device
        (positions past a row's prompt are padding; stage 2 never selects them)."""
        return self.ops.gather_channels(self.k_t[layer], view.host_pages, channels, out)

    def sketch_token_scores(
        self, layer: int, view: DecodeView, q: torch.Tensor, d_s: int, chunk: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both stages from the GPU tier for q [B, Hq, D]: d_s channels per KV head picked with q (Eq. 10, against
        each row's max_abs), then every prompt key's sketch scored on them -> scores [B, H, pages*256] (positions
        past a row's prompt are padding; never selected), and with `chunk` the maxima of its blocks of that many
        positions inside the rows' middle ranges (stage 2's top-k by blocks), from the same launch on CUDA."""
        channels, qc = self.channel_ops.select_channels(q, self.max_abs[layer], view.slots, d_s)
        sketch = (
            qc,
            channels,
            self.sk_packed[layer],
            self.sk_scale[layer],
            self.sk_zero[layer],
            view.sketch_pages,
            self.sketch_bits,
        )
        if not chunk:
            return self.sketch_ops.sketch_scores(*sketch), None
        return self.sketch_ops.sketch_scores_and_maxima(
            *sketch, view.mid_begin, view.mid_end, chunk
        )

    @property
    def decode_copies(self) -> DeviceCopies | None:
        """The GPU copies a decode step's fetch reads where a page has one (None: no copy slots)."""
        return None if self.copy_rows is None else self.copies

    def fetch_rows(
        self, layer: int, view: DecodeView, idx: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The top-k fetch: rows [B, H, k, 2D] (K then V) of prompt positions idx [B, H, k] from the host tier,
        or from a page's GPU copy where it has one, or from the rows the row's last step fetched (reuse_rows),
        which then become the first of these that are `valid`."""
        copies = (None, None)
        if self.copy_rows is not None:
            copies = (self.copy_rows[layer], view.copy_slots)
        if self.kept_pos is None:
            return self.ops.gather_rows(self.rows[layer], view.host_pages, idx, *copies)
        kept = (self.kept_rows[layer], self.kept_pos[layer], view.slots)
        out = self.ops.gather_rows(self.rows[layer], view.host_pages, idx, *copies, kept)
        n = min(self.kept_pos.shape[-1], idx.shape[-1])
        pos = idx[..., :n] if valid is None else torch.where(valid[..., :n], idx[..., :n], -1)
        self.kept_pos[layer, view.slots, :, :n] = pos
        if n < self.kept_pos.shape[-1]:  # a static shape per captured graph
            self.kept_pos[layer, view.slots, :, n:] = -1
        self.kept_rows[layer, view.slots, :, :n] = out[:, :, :n]
        return out

    def attend(
        self,
        layer: int,
        view: DecodeView,
        q: torch.Tensor,
        fetched: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Exact attention of q [B, Hq, D] over the sink + recent window, the generated tokens (this step's
        included) and the fetched rows [B, H, k, 2D] where `valid`."""
        return self.attn_ops.sparse_decode_attention(
            q,
            self.win_k[layer],
            self.win_v[layer],
            view.slots,
            view.win_mask,
            self.gen_k[layer],
            self.gen_v[layer],
            view.gen_read,
            view.gen_mask,
            fetched,
            valid,
            self.d**-0.5,
        )
