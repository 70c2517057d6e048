"""GPU copies of host-tier pages (tailor): a prefill that continues a cached prefix (one document, many users; a
chat's earlier turns) reads the prefix's token rows back from GPU memory where a page has a copy, not over PCIe.
This is the GPU level of a two-level prefix cache (SGLang's HiCache keeps the same hierarchy). Decode steps'
top-k fetches read those copies too (HBM, not PCIe): a shared document's rows, or any prompt's while slots last.

A fixed number of copy slots, kept by least recent use. A page gets a slot when it is written (the prefill that
computes it writes the copy too, from the GPU) and keeps it while later prefills read it; when the slots run out, the
least recently used page whose copy is not needed in the step loses its slot. Every write of a host page goes
through its copy (or takes a slot anew), so a copy is never stale; a freed page's copy simply ages out.

Resident pages (`resident`, the page ids past the host tier's pinned pages) have only their copy: a slot each of
their own after the others, never lost, so the batch can hold requests whose prompts the host tier has no room for.
Their rows are never written to the host tier (`host_writes`: no destination); reads index its scratch page
(`host_index`), where the copy replaces what they would read.
Bookkeeping only: OffloadStore holds the tensors, with one more slot, the scratch that pages without a copy write
to."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from .host_memory import to_device


class PrefixReads(NamedTuple):
    """How one step reads a layer's prefix pages (count of them, into rows [pages, ...] in order):
    - host_runs: (first host page, its index in the rows, length) per run of pages without a copy, read over PCIe;
    - at, slots: the indices in the rows of the pages with a copy, and their copies' slots (None for none);
    - run: the first slot when every page has a copy and their slots follow one another (a prompt written into
      free slots in order): the rows are then the copies themselves, read in place (None otherwise)."""

    pages: int
    host_runs: tuple
    at: torch.Tensor | None
    slots: torch.Tensor | None
    run: int | None = None


class DeviceCopies:
    def __init__(self, slots: int, pinned: int = 0, resident: int = 0):
        """`slots` kept by least recent use; with `resident` pages, host pages [pinned, pinned + resident) have
        slots [slots, slots + resident) for good (and the host tier a scratch page, `pinned`, that their reads
        index)."""
        self.slots, self.pinned, self.resident = slots, pinned, resident
        self.scratch = slots + resident  # the slot of pages without a copy (written, never read)
        self._slot: dict[int, int] = {}  # host page -> slot
        self._page: OrderedDict[int, int] = (
            OrderedDict()
        )  # slot -> host page, least recently used first
        self._free = list(range(slots - 1, -1, -1))
        self._unwritten: set[int] = (
            set()
        )  # pages given a slot this step that they are read before filling
        # host page -> the slot whose copy holds its rows (-1: none): what decode steps' fetches read, by index
        # (numpy: written inside and outside torch's inference mode alike)
        self._readable = np.full(pinned + resident, -1, dtype=np.int64)
        self._readable[pinned:] = np.arange(slots, slots + resident)

    @property
    def num_pages(self) -> int:
        """Host pages with a copy (resident pages included)."""
        return len(self._slot) + self.resident

    def _is_resident(self, page: int) -> bool:
        return self.pinned <= page < self.pinned + self.resident

    def _held(self, page: int) -> int | None:
        """The slot a page holds, filled or not (None: none)."""
        if self._is_resident(page):
            return self.slots + page - self.pinned
        return self._slot.get(page)

    def slot(self, page: int) -> int | None:
        """The slot of a page whose copy holds its rows (None: none yet)."""
        return None if page in self._unwritten else self._held(page)

    def host_writes(self, pages: torch.Tensor) -> torch.Tensor:
        """Host pages (CPU, long) as destinations of a prompt's rows in the host tier: -1 (none) for resident
        pages, whose rows go to their GPU copies alone."""
        return torch.where(pages < self.pinned, pages, -1) if self.resident else pages

    def host_index(self, pages: torch.Tensor) -> torch.Tensor:
        """Host pages (CPU, long; -1 for none) as indices of the host tier's tensors: resident pages at its scratch
        page."""
        return pages.clamp(max=self.pinned) if self.resident else pages

    def plan(self, read: list[int], written: list[int]) -> None:
        """One step's use: the pages it reads (their copies are recently used and kept through the step) and the
        pages it writes, which get a slot (their own, a free one, or the least recently used one neither read nor
        written in the step); those for which none is left get none. A page without a copy that the step also
        reads (a prompt's partly computed page, before its next chunk) is read from the host tier in this step,
        its new slot being filled only as the step writes it. Resident pages keep their slots."""
        if self.resident:
            read = [p for p in read if not self._is_resident(p)]
            written = [p for p in written if not self._is_resident(p)]
        for p in read:
            if p in self._slot:
                self._page.move_to_end(self._slot[p])
        reading = set(read)
        keep = reading | set(written)
        for p in self._unwritten:  # filled by the last step's writes
            if p in self._slot:
                self._mark(p, self._slot[p])
        self._unwritten = set()
        for p in written:
            if p in self._slot:
                self._page.move_to_end(self._slot[p])
                continue
            s = self._take(keep)
            if s is None:
                return
            self._slot[p], self._page[s] = s, p
            if p in reading:
                self._unwritten.add(p)
            else:
                self._mark(p, s)

    def forget(self, pages: list[int]) -> None:
        """Free the slots of pages whose contents no step will read (a request's pages that no cached block keeps)."""
        for p in pages:
            s = self._slot.pop(p, None)
            if s is not None:
                del self._page[s]
                self._free.append(s)
                self._mark(p, -1)

    def _take(self, keep: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for s, p in self._page.items():
            if p not in keep:
                del self._page[s], self._slot[p]
                self._mark(p, -1)
                return s
        return None

    def readable(self, pages: torch.Tensor) -> torch.Tensor:
        """slot() of each page (CPU, long) as one index, -1 for none: what a decode step's top-k fetch reads."""
        self._grow(int(pages.max()) + 1 if pages.numel() else 0)
        return torch.from_numpy(self._readable[pages.numpy()])

    def _grow(self, n: int) -> None:
        if n > self._readable.size:
            self._readable = np.concatenate([self._readable, np.full(n - self._readable.size, -1)])

    def _mark(self, page: int, slot: int) -> None:
        self._grow(page + 1)
        self._readable[page] = slot

    def slots_of(self, pages: torch.Tensor) -> torch.Tensor:
        """The slot of each written page (the scratch where it has none)."""
        slots = [self._held(p) for p in pages.tolist()]
        return torch.tensor([self.scratch if s is None else s for s in slots], dtype=torch.long)

    def reads(self, runs: tuple, device) -> PrefixReads:
        """Split reads of host page runs (first page, index, length) into runs over PCIe and copies on the GPU."""
        host, at, slots = [], [], []
        for first, index, count in runs:
            for j in range(count):
                page, i = first + j, index + j
                s = self.slot(page)
                if s is not None:
                    at.append(i)
                    slots.append(s)
                elif host and host[-1][0] + host[-1][2] == page and host[-1][1] + host[-1][2] == i:
                    host[-1] = (host[-1][0], host[-1][1], host[-1][2] + 1)
                else:
                    host.append((page, i, 1))
        pages = sum(count for _, _, count in runs)
        if not at:
            return PrefixReads(pages, tuple(host), None, None)
        run = slots[0] if not host and slots == list(range(slots[0], slots[0] + pages)) else None
        return PrefixReads(
            pages, tuple(host), *(to_device(torch.tensor(x), device) for x in (at, slots)), run
        )
