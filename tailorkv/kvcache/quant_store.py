"""KV storage of TailorKV's quantization-friendly ("Q") layers, also the whole of the `kivi` baseline.

Per layer and request: K quantized per channel in 64-token pages for positions [0, kq), kq a multiple of
`residual`, the rest in a full-precision tail; V quantized per token for positions [0, n - residual), the last
`residual` tokens in a full-precision window. Prefill (in one step or in chunks) quantizes K in multiples of
`residual` and all V but the last `residual` tokens; each decode step appends to the K tail (quantized as one
block when it reaches `residual`) and slides the V window (the oldest token beyond it is quantized). Paper §2,
KIVI's rules.
The V window is a ring of residual + 1 slots (token t at t % (residual + 1)), so that a decode step's writes do
not depend on what an earlier run of the same step wrote: a captured CUDA graph's warm-up run, then its replay.
"""

from __future__ import annotations

import torch

from ..kernels import kivi
from .prompt_rows import prompt_span
from .staging import StagedInputs
from .tailor_config import TailorConfig

PAGE = 64  # tokens per quantized page = one K quantization group


class QuantState:
    """Per request: its quantized pages, its window slot, its prompt's length, and how many tokens are quantized /
    cached."""

    def __init__(self, pages: list[int], slot: int, device, prompt_len: int):
        self.pages = torch.tensor(pages, dtype=torch.long, device=device)
        self.pages_cpu = torch.tensor(pages, dtype=torch.long)
        self.slot, self.prompt_len = slot, prompt_len
        self.n = 0  # tokens cached
        self.kq = 0  # K tokens quantized (a multiple of residual)

    def grow(self, pages: list[int]) -> None:
        more = torch.tensor(pages, dtype=torch.long)
        self.pages = torch.cat([self.pages, more.to(self.pages.device)])
        self.pages_cpu = torch.cat([self.pages_cpu, more])

    def after(self, n: int, residual: int) -> tuple[int, int]:
        """(n, kq) once the step that brings the cache to n tokens has been stored."""
        if n <= self.prompt_len:  # prefill quantizes K in multiples of residual
            return n, n - n % residual
        if n - self.kq == residual:  # the decode tail just filled up and was quantized
            return n, n
        return n, self.kq

    def pages_after(self, ahead: int = 0) -> int:
        """Pages this step's tokens (and `ahead` more) cover: the pages reserved for later answer tokens are not
        among them."""
        return -(-(self.n + 1 + ahead) // PAGE)

    def advance(self, n: int, residual: int) -> None:
        """After every Q layer stored the step's tokens: the request now caches n tokens."""
        self.n, self.kq = self.after(n, residual)


def share_groups(
    pages: list[torch.Tensor], packed: list[int], group: int, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that begin with the same pages (a document the prefix cache shares), in groups of at most `group`, for
    the paged kernel to attend their common pages once: (members [rows, group] int64: a group's first row lists its
    rows and leads it, every other member names the leader first, a row alone names itself; shared [rows] int64: the
    tokens of the pages a row's whole group shares, each packed in K and V for every member: `packed[i]` = row i's
    min(kq, vq); 0 for a row alone). pages[i]: row i's page ids (CPU); `rows` (default: one per page list) pads
    the tables with rows alone, as a captured graph's padding rows are."""
    n = len(pages) if rows is None else rows
    members = torch.full((n, group), -1, dtype=torch.long)
    members[:, 0] = torch.arange(n)
    shared = torch.zeros(n, dtype=torch.long)
    by_first: dict[int, list[int]] = {}
    for i, (pg, limit) in enumerate(zip(pages, packed)):
        if limit >= PAGE:
            by_first.setdefault(int(pg[0]), []).append(i)
    for same in by_first.values():
        for at in range(0, len(same) - 1, group):
            grp = same[at : at + group]
            if len(grp) < 2:
                continue
            width = min(packed[i] for i in grp) // PAGE
            lead = pages[grp[0]]
            for i in grp[1:]:
                differ = (pages[i][:width] != lead[:width]).nonzero()
                width = int(differ[0]) if len(differ) else width
            members[grp[0], : len(grp)] = torch.tensor(grp)
            members[grp[1:], 0] = grp[0]
            shared[grp] = width * PAGE
    return members, shared


class QuantView:
    """The decode rows of one step in batch tensors, read by every Q layer: built once per step, or kept as the
    static inputs of a captured CUDA graph and refilled each step. Each row appends one token: its key at
    `k_write` in the K tail, its value at `v_write` in the V ring; a K tail that fills up is quantized into the
    pages `k_dest`, and the value leaving a full V window (ring slot `v_old`) into token slot `v_dest` (rows with
    nothing to quantize, and padding rows, point at the scratch page and slot, so every row runs the same ops).
    Attention then reads `lengths` = (n, kq, vq) per row (paged_decode_attention), and with `share_rows` > 1 the
    groups of rows that begin with the same pages (share_groups: `members`, `shared`)."""

    def __init__(self, rows: int, pages: int, residual: int, device, share_rows: int = 1):
        i64 = torch.long
        self.share_rows = share_rows
        shares = (
            {"members": ((rows, share_rows), i64), "shared": ((rows,), i64)}
            if share_rows > 1
            else {}
        )
        self.staged = StagedInputs(
            {
                **shares,
                "pages": ((rows, pages), i64),
                "slots": ((rows,), i64),
                "lengths": ((rows, 3), i64),
                "k_write": ((rows,), i64),
                "v_write": ((rows,), i64),
                "v_old": ((rows,), i64),
                "v_dest": ((rows,), i64),
                "k_dest": ((rows, residual // PAGE), i64),
            },
            device,
        )
        self.__dict__.update(self.staged.device)

    @staticmethod
    def pages_of(states: list[QuantState], ahead: int = 0) -> int:
        """The view's width: the most pages a row's tokens cover after this step (and `ahead` more), all that a step
        reads or writes."""
        return max(st.pages_after(ahead) for st in states)

    def fill(
        self, states: list[QuantState], residual: int, scratch_page: int, scratch_slot: int
    ) -> None:
        h = self.staged.host()
        r, m = residual, residual // PAGE
        h["pages"].fill_(scratch_page)
        h["slots"].fill_(scratch_slot)
        h["lengths"].copy_(
            torch.tensor([1, 0, 0])
        )  # padding rows: one token, the scratch slot's first
        for name in ("k_write", "v_write", "v_old"):
            h[name].zero_()
        h["k_dest"].fill_(scratch_page)
        h["v_dest"].fill_(scratch_page * PAGE)
        rows = []  # per state: slot, n, kq, vq, k_write, v_write
        for i, st in enumerate(states):
            n, kq = st.after(st.n + 1, r)
            rows.append((st.slot, n, kq, max(n - r, 0), st.n - st.kq, st.n % (r + 1)))
            used = st.pages_after()
            h["pages"][i, :used] = st.pages_cpu[:used]
            if kq > st.kq:  # this token fills the K tail
                h["k_dest"][i] = st.pages_cpu[st.kq // PAGE : st.kq // PAGE + m]
            if st.n >= r:  # the V window is full: its oldest token (position st.n - r) is quantized
                old = st.n - r
                h["v_old"][i], h["v_dest"][i] = (
                    old % (r + 1),
                    int(st.pages_cpu[old // PAGE]) * PAGE + old % PAGE,
                )
        if rows:
            cols = torch.tensor(rows).T
            n = len(rows)
            h["slots"][:n], h["lengths"][:n], h["k_write"][:n], h["v_write"][:n] = (
                cols[0],
                cols[1:4].T,
                cols[4],
                cols[5],
            )
        if self.share_rows > 1:
            packed = [min(kq, vq) for _, _, kq, vq, _, _ in rows]
            h["members"][:], h["shared"][:] = share_groups(
                [st.pages_cpu for st in states], packed, self.share_rows, len(h["shared"])
            )
        self.staged.send()


class QuantStore:
    """Packed K/V pages for `num_layers` Q layers plus full-precision tails in per-request window slots."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        cfg: TailorConfig,
        device,
        dtype,
    ):
        self.cfg, self.h, self.d, self.bits = cfg, num_kv_heads, head_dim, cfg.quant_bits
        self.vgroup = kivi.value_group(cfg.group_size, head_dim, self.bits)
        self.ops = kivi.ops(device)
        # one page and one window slot more than the pools hand out: the scratch of QuantView's idle rows
        self.scratch_page, self.scratch_slot = num_pages, num_slots
        L, P, H, D, b = num_layers, num_pages + 1, num_kv_heads, head_dim, self.bits
        i32, f16 = dict(device=device, dtype=torch.int32), dict(device=device, dtype=torch.float16)
        self.k_packed = torch.empty(L, P, H, PAGE * b // 32, D, **i32)
        self.k_scale = torch.empty(L, P, H, D, **f16)
        self.k_zero = torch.empty(L, P, H, D, **f16)
        self.v_packed = torch.empty(L, P * PAGE, H, D * b // 32, **i32)
        self.v_scale = torch.empty(L, P * PAGE, H, D // self.vgroup, **f16)
        self.v_zero = torch.empty(L, P * PAGE, H, D // self.vgroup, **f16)
        r = cfg.residual
        self.k_tail = torch.zeros(L, num_slots + 1, r, H, D, device=device, dtype=dtype)
        self.v_win = torch.zeros(L, num_slots + 1, r + 1, H, D, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_page(num_layers: int, h: int, d: int, bits: int, vgroup: int) -> int:
        k = h * (PAGE * bits // 32) * d * 4 + 2 * h * d * 2
        v = PAGE * h * (d * bits // 32) * 4 + 2 * PAGE * h * (d // vgroup) * 2
        return num_layers * (k + v)

    @staticmethod
    def bytes_per_slot(num_layers: int, h: int, d: int, residual: int, itemsize: int) -> int:
        return num_layers * (2 * residual + 1) * h * d * itemsize

    # ---- writing ----------------------------------------------------------------------------------------------
    def _quantize_k(self, layer: int, st: QuantState, k: torch.Tensor, begin: int) -> None:
        """k [m*64, H, D] at positions [begin, begin + m*64) -> packed pages."""
        m = k.shape[0] // PAGE
        x = k.view(m, PAGE, self.h, self.d).transpose(1, 2).reshape(m * self.h, PAGE, self.d)
        q = self.ops.quantize_keys(x, self.bits, PAGE)
        pages = st.pages[begin // PAGE : begin // PAGE + m]
        self.k_packed[layer, pages] = q.packed.view(m, self.h, -1, self.d)
        self.k_scale[layer, pages] = q.scale.view(m, self.h, self.d)
        self.k_zero[layer, pages] = q.zero.view(m, self.h, self.d)

    def _quantize_v(self, layer: int, st: QuantState, v: torch.Tensor, begin: int) -> None:
        """v [m, H, D] at positions [begin, begin + m) -> packed per-token rows."""
        m = v.shape[0]
        q = self.ops.quantize_values(v.reshape(1, m * self.h, self.d), self.bits, self.vgroup)
        slots = self._token_slots(st, begin, begin + m)
        self.v_packed[layer, slots] = q.packed.view(m, self.h, -1)
        self.v_scale[layer, slots] = q.scale.view(m, self.h, -1)
        self.v_zero[layer, slots] = q.zero.view(m, self.h, -1)

    def _token_slots(self, st: QuantState, begin: int, end: int) -> torch.Tensor:
        pos = torch.arange(begin, end, device=st.pages.device)
        return st.pages[pos // PAGE] * PAGE + pos % PAGE

    def prefill(
        self,
        layer: int,
        st: QuantState,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        final: bool = True,
    ) -> None:
        """Store a prompt's k, v [n - start, H, D] of one layer, its tokens from `start` (a multiple of 64) to n, the
        prompt's end (`final`) or a chunk's (then its pages only: the groups of 64 keys up to n - n % 64, all
        values; the next chunk starts at or before n - n % 64). The pages of the tokens before `start` are shared
        with an earlier request or stored by earlier chunks and hold them; where the full-precision tails reach
        back before `start`, `prefix` (the exact k, v [start, H, D] of those tokens, from the host tier) fills
        them. Beyond KIVI's rules the pages also get the tails' tokens quantized (K in whole groups of 64, all of
        V): the values decode writes there as they leave the tails, so every page of the prompt is final at once,
        and a later request that shares it needs none of it recomputed."""
        n, r = start + k.shape[0], self.cfg.residual
        kq, vq = n - n % r, max(n - r, 0)
        if final and prefix is None and start > vq:
            raise ValueError(
                f"a shared prefix of {start} tokens reaches into the last {r} of a {n}-token prompt; "
                "its exact rows are needed"
            )
        if n - n % PAGE > start:
            self._quantize_k(layer, st, k[: n - n % PAGE - start], start)
        self._quantize_v(layer, st, v, start)
        if not final:
            return
        pk, pv = prefix if prefix is not None else (None, None)
        if n > kq:  # a prompt of a multiple of `residual` tokens leaves the K tail empty
            self.k_tail[layer, st.slot, : n - kq] = torch.cat(prompt_span(kq, n, start, pk, k))
        self.v_win[layer, st.slot, self._ring(vq, n)] = torch.cat(prompt_span(vq, n, start, pv, v))

    def _ring(self, begin: int, end: int) -> torch.Tensor:
        """V-window slots of positions [begin, end)."""
        return torch.arange(begin, end, device=self.v_win.device) % self.v_win.shape[2]

    def append(self, layer: int, view: QuantView, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store each decode row's new k, v [B, H, D] (the requests' counts move in `advance`). Every row runs the
        same ops, whatever its state (CUDA-graph safe): its K tail is quantized and written to k_dest (scratch
        unless the tail just filled), its V window's oldest token to v_dest (scratch unless the window is full).
        Running a step's append twice leaves what running it once does."""
        m, (rows, h, d) = self.cfg.residual // PAGE, k.shape
        self.k_tail[layer, view.slots, view.k_write] = k.to(self.k_tail.dtype)
        tail = self.k_tail[layer, view.slots].view(rows, m, PAGE, h, d).permute(0, 1, 3, 2, 4)
        q = self.ops.quantize_keys(tail.reshape(rows * m * h, PAGE, d), self.bits, PAGE)
        dest = view.k_dest.flatten()
        self.k_packed[layer, dest] = q.packed.view(rows * m, h, -1, d)
        self.k_scale[layer, dest] = q.scale.view(rows * m, h, d)
        self.k_zero[layer, dest] = q.zero.view(rows * m, h, d)
        self.v_win[layer, view.slots, view.v_write] = v.to(self.v_win.dtype)
        leaving = self.v_win[layer, view.slots, view.v_old]
        qv = self.ops.quantize_values(leaving.reshape(1, rows * h, d), self.bits, self.vgroup)
        self.v_packed[layer, view.v_dest] = qv.packed.view(rows, h, -1)
        self.v_scale[layer, view.v_dest] = qv.scale.view(rows, h, -1)
        self.v_zero[layer, view.v_dest] = qv.zero.view(rows, h, -1)

    # ---- reading ----------------------------------------------------------------------------------------------
    def dequantized(self, layer: int, st: QuantState, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, H, D] of the request as attention sees them (dequantized part + full-precision tails),
        including the token appended in the current step."""
        r = self.cfg.residual
        n, kq = st.after(st.n + 1, r)
        vq = max(n - r, 0)
        ks, vs = [], []
        if kq:
            pages = st.pages[: kq // PAGE]
            m = pages.numel()
            qk = kivi.QuantizedKeys(
                self.k_packed[layer, pages].view(m * self.h, -1, self.d),
                self.k_scale[layer, pages].view(m * self.h, 1, self.d),
                self.k_zero[layer, pages].view(m * self.h, 1, self.d),
            )
            deq = self.ops.dequantize_keys(qk, self.bits, PAGE, PAGE, dtype)
            ks.append(deq.view(m, self.h, PAGE, self.d).transpose(1, 2).reshape(kq, self.h, self.d))
        ks.append(self.k_tail[layer, st.slot, : n - kq].to(dtype))
        if vq:
            slots = self._token_slots(st, 0, vq)
            qv = kivi.QuantizedValues(
                self.v_packed[layer, slots].view(1, vq * self.h, -1),
                self.v_scale[layer, slots].view(1, vq * self.h, -1),
                self.v_zero[layer, slots].view(1, vq * self.h, -1),
            )
            vs.append(
                self.ops.dequantize_values(qv, self.bits, self.vgroup, dtype).view(
                    vq, self.h, self.d
                )
            )
        vs.append(self.v_win[layer, st.slot, self._ring(vq, n)].to(dtype))
        return torch.cat(ks), torch.cat(vs)

    def decode_attention(self, layer: int, view: QuantView, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D] of each row's newest token (already appended) over all its cached tokens, by the paged
        kernel: packed pages where quantized, the full-precision K tail and V window for the rest."""
        out = self.ops.paged_decode_attention(
            q,
            self.k_packed[layer],
            self.k_scale[layer],
            self.k_zero[layer],
            self.v_packed[layer],
            self.v_scale[layer],
            self.v_zero[layer],
            self.k_tail[layer],
            self.v_win[layer],
            view.pages,
            view.slots,
            view.lengths,
            self.bits,
            self.d**-0.5,
            **({"members": view.members, "shared": view.shared} if view.share_rows > 1 else {}),
        )
        return out.to(q.dtype)
