"""Where the rows of prompts being prefilled come from and go: their tokens before `start` sit in a shared prefix
(read back from the host tier), the rest in this step's new tokens, after the tokens of a cached partial block
where a row continues one (read back with the prefix); prefill rows with a common `start` are stored together,
through index tensors built once per step and used by every layer."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from ..memory.device_copies import DeviceCopies, PrefixReads
from ..memory.host_memory import to_device

HOST_PAGE = 256  # tokens per host-tier page
NO_COPIES = DeviceCopies(0)  # no page has a GPU copy


def prompt_span(
    begin: int, end: int, start: int, before: torch.Tensor | None, after: torch.Tensor
) -> list[torch.Tensor]:
    """Rows of prompt positions [begin, end): those under `start` from `before` (the shared prefix, positions from
    0), the rest from `after` (the tokens from `start` on); torch.cat them."""
    parts = [before[begin : min(end, start)]] if begin < min(end, start) else []
    return parts + (
        [after[max(begin, start) - start : end - start]] if end > max(begin, start) else []
    )


class PromptRows(NamedTuple):
    """Prefill rows whose prompts are computed from a common `start` (0, or a shared prefix's length), their new
    tokens concatenated (T of them), stored by one set of ops per layer. A row may compute a chunk of its prompt:
    its tokens up to `start` + its count, the rest in later steps.
    - page_src [P * 256]: for each slot of their host pages from `start` to the end of their chunks, the new token it
      holds; a slot past a row's chunk repeats the row's last token (a page's min/max per channel, which the key
      sketch quantizes with, stays that of its real tokens; nothing reads those slots before a later chunk or
      decode rewrites them);
    - host_pages, sketch_pages [P]: those pages (no sketch pages without a key sketch), the host pages as their rows'
      destinations in the host tier (DeviceCopies.host_writes: -1, none, for a resident page); copy_slots [P]:
      their copies' slots in the GPU tier (DeviceCopies; its scratch slot for a page without one);
    - slots [R]: the rows' window slots; continues [R]: the row computed earlier chunks, its slot's max|K| is theirs;
    - win_slots [R]: the slot each row's sink + recent window goes to once its last chunk is computed (-1, the
      scratch slot, before); win_new, win_pre [R, W] and win_from_pre: that window (W slots, past its length
      repeating slot 0) as indices into the new tokens or the prefix;
    - cu: where each row's tokens begin among the T, and T (host ints)."""

    page_src: torch.Tensor
    host_pages: torch.Tensor
    sketch_pages: torch.Tensor
    copy_slots: torch.Tensor
    slots: torch.Tensor
    continues: torch.Tensor
    win_slots: torch.Tensor
    win_new: torch.Tensor
    win_pre: torch.Tensor
    win_from_pre: torch.Tensor
    cu: tuple[int, ...]

    @classmethod
    def build(
        cls,
        states: list,
        new: list[int],
        start: int,
        window: int,
        device,
        copies: DeviceCopies | None = None,
    ) -> PromptRows:
        """`states`: the rows' OffloadStates (host and sketch pages, window bounds, tokens computed), each row's
        chunk ending at start + new; `copies`: the GPU copies of host pages (None: none)."""
        p0, t = start // HOST_PAGE, 0
        page_src, win, pages, sketch = [], [], [], []
        for st, n in zip(states, new):
            p1 = -(-(start + n) // HOST_PAGE)  # the pages of the chunk
            page_src.append(torch.arange(t, t + (p1 - p0) * HOST_PAGE).clamp_(max=t + n - 1))
            pages.append(st.host_pages_cpu[p0:p1])
            sketch.append(st.sketch_pages_cpu[p0:p1])
            final = start + n == st.prompt_len
            pos = (
                torch.cat([torch.arange(st.n_sink), torch.arange(st.recent_begin, start + n)])
                if final
                else torch.zeros(0, dtype=torch.long)
            )
            win.append(torch.nn.functional.pad(pos, (0, window - pos.numel())))
            t += n
        pos = torch.stack(win)
        from_pre = pos < start
        pages = [torch.cat(pages), torch.cat(sketch)]
        offsets = torch.tensor([0] + new[:-1]).cumsum(0)[:, None]
        slots = torch.tensor([st.slot for st in states])
        final = torch.tensor([start + n == st.prompt_len for st, n in zip(states, new)])
        copies = NO_COPIES if copies is None else copies
        tensors = (
            torch.cat(page_src),
            copies.host_writes(pages[0]),
            pages[1],
            copies.slots_of(pages[0]),
            slots,
            torch.tensor([st.n > 0 for st in states]),
            torch.where(final, slots, -1),
            torch.where(from_pre, 0, pos - start + offsets),
            torch.where(from_pre, pos, 0),
            from_pre,
        )
        return cls(
            *(to_device(x, device) for x in tensors), tuple(itertools.accumulate(new, initial=0))
        )


class PrefillGroup(NamedTuple):
    """Prefill rows that continue one prefix of `start` tokens (a multiple of 256, 0 for none: shared blocks, and a
    row's own earlier chunks): their prompts are stored from `start` on, each row's `lens` tokens being the tokens
    it computed or took from the cache after `start` (its "tail", read from the host page that holds them: its own,
    or a cached partial block's) followed by its new tokens (the batch's, at `sel`).
    - cu, cu_k: cumulative new tokens and stored tokens per row;
    - ext [sum(lens)] or None (no tails): the stored tokens in order as indices into [new tokens | tail pages' rows];
    - reads: the host pages to read (the prefix's, then one per tail), from their GPU copies where they have one;
    - prompt: their PromptRows;
    - prefix_max: some row computes its first chunk after the prefix, so the prefix's max|K| is needed (the others
      keep a running max in their slots)."""

    sel: slice | torch.Tensor
    start: int
    lens: list[int]
    cu: list[int]
    cu_k: list[int]
    ext: torch.Tensor | None
    reads: PrefixReads
    prompt: PromptRows | None
    prefix_max: bool

    @property
    def prefix_pages(self) -> int:
        return self.start // HOST_PAGE

    @classmethod
    def build(
        cls,
        sel,
        runs: tuple,
        starts: list[int],
        new: list[int],
        states: list | None,
        tail_pages: list,
        window: int,
        device,
        copies: DeviceCopies | None = None,
    ) -> PrefillGroup:
        """`runs`: the shared prefix's host pages (page_runs); `starts`, `new`: each row's first new position and
        count; `tail_pages`: the host page of each row's tail (None without); `states`: their OffloadStates
        (None without a host tier); `copies`: the GPU copies of host pages (None: none)."""
        start = starts[0] // HOST_PAGE * HOST_PAGE
        tails = [s - start for s in starts]
        lens = [m + n for m, n in zip(tails, new)]
        cu = list(itertools.accumulate(new, initial=0))
        total, reads, ext, t = cu[-1], list(runs), [], 0
        for i, (m, n) in enumerate(zip(tails, new)):
            if m:
                ext.append(torch.arange(total + t * HOST_PAGE, total + t * HOST_PAGE + m))
                reads.append((tail_pages[i], start // HOST_PAGE + t, 1))
                t += 1
            ext.append(torch.arange(cu[i], cu[i] + n))
        prompt = PromptRows.build(states, lens, start, window, device, copies) if states else None
        reads = (NO_COPIES if copies is None else copies).reads(reads, device)
        return cls(
            sel,
            start,
            lens,
            cu,
            list(itertools.accumulate(lens, initial=0)),
            to_device(torch.cat(ext), device) if t else None,
            reads,
            prompt,
            bool(start) and any(st.n == 0 for st in states or ()),
        )
