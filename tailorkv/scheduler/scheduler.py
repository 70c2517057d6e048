"""The continuous-batching scheduler. It sees sequences as token counts and pages, never tensors.

Each step runs every decoding sequence (one token each) plus prefill work under a token budget: the unfinished
prompt chunks of admitted sequences first, then newly admitted ones. Admission reserves, in every pool of both
tiers, the pages for prompt + max_new_tokens, so a running sequence never runs out of memory and nothing is
half-admitted; a sequence that does not fit waits. With prefix caching, admission first takes the longest cached
run of the prompt's full blocks (never the whole prompt: its last token must be computed to give logits), then,
where the policy caches partly filled blocks, the cached partial block after them that shares most of the prompt's
next tokens; it reserves only the rest and starts computing after them. Computed blocks are offered to the cache
as they fill up, and a prompt's partly filled last block once computed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import CapacityError, QueueFullError
from ..memory.layout import KVLayout
from ..memory.pages import MemoryManager
from ..memory.prefix_cache import ROOT, page_hashes


@dataclass
class Seq:
    rid: int
    prompt_len: int
    max_new_tokens: int
    num_computed: int = 0  # tokens whose K/V is in the cache
    num_generated: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    page_keys: list[bytes] = field(
        default_factory=list
    )  # prefix-cache keys of the prompt's full blocks
    prompt_ids: list[int] = field(
        default_factory=list
    )  # with partial blocks cached: their tokens come from here
    partial_page: int | None = (
        None  # the cached partial block's page (partial pool) its first tokens come from
    )
    cache_limit: int | None = (
        None  # at most this many prompt tokens from the cache (the rest is computed)
    )
    queued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = (
        None  # time.perf_counter() when it left the queue for the running batch
    )

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass
class Step:
    """What to compute now: seqs[i] computes `new[i]` tokens starting at its `num_computed`."""

    seqs: list[Seq]
    new: list[int]
    admitted: list[
        tuple[Seq, dict[str, list[int]]]
    ]  # sequences admitted in this step, with their pages


class Scheduler:
    def __init__(
        self,
        memory: MemoryManager,
        layout: KVLayout,
        *,
        max_running: int = 64,
        max_queued: int = 1024,
        chunk_tokens: int = 2048,
    ):
        """`layout`: the KV policy's pools and what a request costs in them; `memory`: the pages of those pools."""
        self.memory, self.layout, self.prefix = memory, layout, memory.prefix
        self.partial_pool = layout.partial_block_pool if memory.prefix else None
        self.max_running, self.max_queued, self.chunk_tokens = max_running, max_queued, chunk_tokens
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}

    def add(self, seq: Seq, prompt_ids: list[int] | None = None) -> None:
        if not self.memory.fits_ever(self.layout.pages_needed(seq.prompt_len, seq.max_new_tokens)):
            raise CapacityError(
                f"a request of {seq.reserved_tokens} tokens (prompt + max_new_tokens) "
                "does not fit in this engine's KV memory"
            )
        if len(self.waiting) >= self.max_queued:
            raise QueueFullError(f"the queue is full ({self.max_queued} waiting requests)")
        if self.prefix and prompt_ids is not None:
            seq.page_keys = page_hashes(prompt_ids, self.prefix.block_tokens)
            if self.partial_pool:
                seq.prompt_ids = prompt_ids
        self.waiting.append(seq)

    def max_total_tokens(self) -> int:
        """The most tokens (prompt + one output token) a single request can hold in this engine's KV memory."""
        lo, hi = 1, 1 << 40
        while lo < hi:  # the largest n that fits: pages needed grow with n
            mid = (lo + hi + 1) // 2
            if self.memory.fits_ever(self.layout.pages_needed(mid - 1, 1)):
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, admit: bool = True) -> Step | None:
        """The next step; `admit=False` leaves the waiting sequences waiting (the running ones still step)."""
        seqs, new = [], []
        for s in self.running.values():
            if not s.prefilling:
                seqs.append(s)
                new.append(1)
        budget = self.chunk_tokens - len(seqs)
        for s in self.running.values():
            if s.prefilling and budget > 0:
                n = self._chunk(
                    s.prompt_len - s.num_computed, budget, first=not any(x.prefilling for x in seqs)
                )
                if n:
                    seqs.append(s)
                    new.append(n)
                    budget -= n
        admitted = []
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_running:
            s = self.waiting[0]
            shared, partial = self._cached_prefix(s)
            cached = (
                len(shared) * self.prefix.block_tokens + (partial[1] if partial else 0)
                if self.prefix
                else 0
            )
            n = self._chunk(
                s.prompt_len - cached, budget, first=not any(x.prefilling for x in seqs)
            )
            if not n:
                break
            pages = self.memory.reserve(
                s.rid,
                self.layout.pages_needed(s.prompt_len, s.max_new_tokens),
                shared,
                partial and partial[0],
            )
            if pages is None:
                break
            if partial:
                s.partial_page = self.prefix.pages[partial[0]][self.partial_pool][0]
            s.num_computed = s.cached_tokens = cached
            s.admitted_at = time.perf_counter()
            self.waiting.popleft()
            self.running[s.rid] = s
            admitted.append((s, pages))
            seqs.append(s)
            new.append(n)
            budget -= n
        return Step(seqs, new, admitted) if seqs else None

    def _cached_prefix(self, s: Seq) -> tuple[list[bytes], tuple[bytes, int] | None]:
        """Keys of the prompt's longest cached run of full blocks and the cached partial block after them (its key,
        the tokens it gives) or None, leaving the prompt's last token to compute."""
        if not self.prefix:
            return [], None
        limit = s.prompt_len - 1 if s.cache_limit is None else min(s.prompt_len - 1, s.cache_limit)
        shared = self.prefix.match(s.page_keys[: self._blocks(limit)])
        if not self.partial_pool:
            return shared, None
        begin = (
            len(shared) * self.prefix.block_tokens
        )  # a partial block holds less than one block's tokens
        return shared, self.prefix.match_partial(
            shared[-1] if shared else ROOT,
            s.prompt_ids[begin : min(limit, begin + self.prefix.block_tokens)],
        )

    def _blocks(self, tokens: int) -> int:
        return max(tokens, 0) // self.prefix.block_tokens

    def _chunk(self, remaining: int, budget: int, first: bool) -> int:
        if not self.layout.whole_prompt_prefill:
            return min(remaining, budget)
        # the whole prompt at once; one over-budget prompt may run alone rather than never
        return remaining if remaining <= budget or first else 0

    def advance(self, step: Step) -> None:
        """The step has run: count its tokens as computed; the prompt pages it filled join the prefix cache."""
        for s, n in zip(step.seqs, step.new):
            done, s.num_computed = s.num_computed, s.num_computed + n
            if self.prefix and done < s.prompt_len:
                end = s.num_computed
                self.memory.cache(s.rid, s.page_keys[: self._blocks(end)], start=self._blocks(done))
                if self.partial_pool and not s.prefilling and end % self.prefix.block_tokens:
                    b = self._blocks(end)
                    self.memory.cache_partial(
                        s.rid,
                        s.page_keys[b - 1] if b else ROOT,
                        s.prompt_ids[b * self.prefix.block_tokens : end],
                        b,
                        self.partial_pool,
                    )

    def finish(self, rid: int, token_ids: list[int] | None = None) -> None:
        """Drop a finished, aborted or failed sequence, waiting or running, and return all its pages. `token_ids`
        (prompt + output) also caches the full pages of its generated tokens, for the next turn of a chat."""
        seq = self.running.pop(rid, None)
        if self.prefix and self.layout.caches_output and seq is not None and token_ids is not None:
            keys, size = seq.page_keys, self.prefix.block_tokens
            more = page_hashes(
                token_ids[len(keys) * size : seq.num_computed], size, keys[-1] if keys else ROOT
            )
            self.memory.cache(rid, keys + more, start=len(keys))
        self.waiting = deque(s for s in self.waiting if s.rid != rid)
        self.memory.release(rid)
