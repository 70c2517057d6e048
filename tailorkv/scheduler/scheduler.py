"""The continuous-batching scheduler. It sees sequences as token counts and pages, never tensors.

Each step runs every decoding sequence (one token each) plus prefill work under a token budget: the unfinished
prompt chunks of admitted sequences first, then newly admitted ones. Admission reserves, in every pool of both
tiers, the pages of the prompt and of an estimate of the answer (`reserve_output` tokens, at most max_new_tokens),
all or nothing; a decoding sequence's pages grow as it generates, and when a pool runs dry the most recently
admitted decoding sequence is retracted to the front of the queue: its pages are freed, its tokens kept, and it is
computed again (prompt and output so far, as one prompt) when it returns, as SGLang and vLLM do. A queued request
that does not fit is passed by later ones that do, at most `max_passes` times; then admission waits for it.
With prefix caching, admission first takes the longest cached run of the prompt's full blocks (never the whole
prompt: its last token must be computed to give logits), then, where the policy caches partly filled blocks, the
cached partial block after them that shares most of the prompt's next tokens; it reserves only the rest and starts
computing after them. Computed blocks are offered to the cache as they fill up, and a prompt's partly filled last
block once computed.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ..errors import CapacityError, QueueFullError
from ..memory.layout import KVLayout
from ..memory.pages import MemoryManager
from ..memory.prefix_cache import ROOT, RecentKeys, page_hashes
from .step_cost import MIN_CHUNK, StepCost

RESERVE_OUTPUT = (
    256  # answer tokens reserved at admission (and added per growth), at most max_new_tokens
)
MAX_PASSES = 16  # a queued request that does not fit is passed by at most this many later ones
MAX_SKIPPED = 64  # queued requests that do not fit looked at per step, at most


@dataclass
class Seq:
    rid: int
    prompt_len: int  # tokens to prefill: the prompt, and after a retraction the output so far too
    max_new_tokens: int
    # the prompt, then every generated token (Request.append): what a retracted sequence computes again
    tokens: list[int] = field(default_factory=list)
    out_reserved: int = 0  # answer tokens (after prompt_len) its pages hold
    after: int | None = (
        None  # a sequence with the same prompt: admitted once that one's prompt is computed
    )
    passed: int = 0  # later requests admitted before it while it did not fit
    num_computed: int = 0  # tokens whose K/V is in the cache
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

    def __post_init__(self):
        self.end_len = self.prompt_len + self.max_new_tokens  # the longest it may become

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def opening(self) -> bool:
        """Its next prompt chunk is its first: nothing computed past the prefix the cache gave it."""
        return self.prefilling and self.num_computed == self.cached_tokens

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
    grown: list[tuple[Seq, dict[str, list[int]]]] = field(
        default_factory=list
    )  # running sequences given more pages, with the new ones
    retracted: list[Seq] = field(default_factory=list)  # sent back to the queue, pages freed


class Scheduler:
    def __init__(
        self,
        memory: MemoryManager,
        layout: KVLayout,
        *,
        max_running: int = 64,
        max_queued: int = 1024,
        chunk_tokens: int = 2048,
        reserve_output: int = RESERVE_OUTPUT,
        max_passes: int = MAX_PASSES,
        cost: StepCost | None = None,
    ):
        """`layout`: the KV policy's pools and what a request costs in them; `memory`: the pages of those pools;
        `cost`: the step-time budget that prompt chunks keep to while requests decode (None: chunk_tokens only)."""
        self.memory, self.layout, self.prefix = memory, layout, memory.prefix
        self.partial_pool = layout.partial_block_pool if memory.prefix else None
        self.recent_keys = RecentKeys(memory.prefix.block_tokens) if memory.prefix else None
        self.max_running, self.max_queued, self.chunk_tokens = max_running, max_queued, chunk_tokens
        self.reserve_output, self.max_passes, self.cost = reserve_output, max_passes, cost
        self.num_retracted = 0  # retractions so far (metrics)
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}

    def max_output(self, prompt_len: int) -> int:
        """The most answer tokens a request of `prompt_len` prompt tokens could ever hold pages for."""
        return self.layout.max_output(prompt_len)

    def add(self, seq: Seq, prompt_ids: list[int] | None = None) -> None:
        need = self.layout.pages_needed(seq.prompt_len, seq.max_new_tokens)
        if not self.memory.fits_ever(need):
            short = [
                f"{n} pages of its {s.tier} pool '{s.name}', which holds {s.num_pages}"
                for s in self.layout.pools
                if (n := need.get(s.name, 0)) > s.num_pages
            ]
            raise CapacityError(
                f"a request of {seq.reserved_tokens} tokens (prompt + max_new_tokens) "
                f"does not fit in this engine's KV memory: it needs {'; '.join(short)}"
            )
        if len(self.waiting) >= self.max_queued:
            raise QueueFullError(f"the queue is full ({self.max_queued} waiting requests)")
        if prompt_ids is not None:
            seq.tokens = list(prompt_ids)
            self._key(seq)
        self.waiting.append(seq)

    def _key(self, seq: Seq) -> None:
        """The prefix-cache keys of the prompt's full blocks (and the prompt, for its partial block)."""
        if self.prefix:
            seq.page_keys = self.recent_keys.keys(seq.tokens[: seq.prompt_len])
            if self.partial_pool:
                seq.prompt_ids = seq.tokens[: seq.prompt_len]

    def max_requests(self, prompt_len: int, output_len: int) -> int:
        """How many requests of `prompt_len` prompt and `output_len` answer tokens the pools hold whole at once (at
        most max_running): a batch of more is retracted before its answers end."""
        need = self.layout.pages_needed(prompt_len, output_len)
        return min(
            [self.max_running] + [self.memory.pools[p].num_pages // n for p, n in need.items() if n]
        )

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
        grown, retracted = self._grow()
        seqs, new = [], []
        for s in self.running.values():
            if not s.prefilling:
                seqs.append(s)
                new.append(1)
        budget = self.chunk_tokens - len(seqs)
        decoding = len(seqs)
        flops = self.cost.allowance(bool(decoding)) if self.cost else math.inf
        opened = False  # a request's first chunk in the step: its opening cost is taken once

        def opening_cost(s: Seq) -> float:
            """Flops of the budget that opening `s` in this step costs beyond its chunk's."""
            return (
                0.0 if opened or not s.opening or math.isinf(flops) else self.cost.opening_flops()
            )

        for s in self.running.values():
            if s.prefilling and budget > 0:
                extra = opening_cost(s)
                n, left = self._chunk(s, budget, flops - extra, first=len(seqs) == decoding)
                if n:
                    flops, opened = left, opened or extra > 0
                    seqs.append(s)
                    new.append(n)
                    budget -= n
        admitted, skipped = [], []  # skipped: queued before the next one, not admitted
        for s in list(self.waiting) if admit else ():
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            extra = opening_cost(s)
            if (
                len(seqs) > decoding
                and not self._chunk(s, budget, flops - extra, False, s.prompt_len)[0]
            ):
                break  # the step-time budget is spent (a request is never admitted with no tokens to compute)
            if len(skipped) >= MAX_SKIPPED or any(w.passed >= self.max_passes for w in skipped):
                break  # passed too often: the queue waits for it
            if s.after is not None and self._prefilling(s.after):
                continue  # then most of its prompt comes from the cache
            pages = self._admit(s)
            if pages is None:
                skipped.append(s)
                continue
            for w in skipped:
                w.passed += 1
            n, flops = self._chunk(s, budget, flops - extra, first=len(seqs) == decoding)
            opened = opened or extra > 0
            self.waiting.remove(s)
            self.running[s.rid] = s
            admitted.append((s, pages))
            seqs.append(s)
            new.append(n)
            budget -= n
        return Step(seqs, new, admitted, grown, retracted) if seqs or retracted else None

    def _chunk(
        self, s: Seq, budget: int, flops: float, first: bool, prefix: int | None = None
    ) -> tuple[int, float]:
        """How many prompt tokens `s` computes in this step after `prefix` (default: its computed tokens), within
        `budget` tokens and `flops` of prompt work (the step-time budget's), and the flops left after them. The
        step's first prompt chunk takes MIN_CHUNK tokens at least, so that a prompt always advances."""
        prefix = s.num_computed if prefix is None else prefix
        n = min(s.prompt_len - s.num_computed, budget)
        if math.isinf(flops):
            return n, flops
        n = min(n, max(self.cost.tokens_within(flops, prefix), MIN_CHUNK if first else 0))
        return n, flops - self.cost.flops(n, prefix)

    def _prefilling(self, rid: int) -> bool:
        """Whether sequence `rid` waits or computes its prompt."""
        running = self.running.get(rid)
        return running.prefilling if running else any(w.rid == rid for w in self.waiting)

    def _admit(self, s: Seq) -> dict[str, list[int]] | None:
        """Reserve the pages of a waiting sequence's prompt and of the first answer tokens, or None (nothing
        taken) when they do not fit the pools."""
        shared, partial = self._cached_prefix(s)
        cached = (
            len(shared) * self.prefix.block_tokens + (partial[1] if partial else 0)
            if self.prefix
            else 0
        )
        out = min(s.end_len - s.prompt_len, self.reserve_output)
        pages = self.memory.reserve(
            s.rid, self.layout.pages_needed(s.prompt_len, out), shared, partial and partial[0]
        )
        if pages is None:
            return None
        if partial:
            s.partial_page = self.prefix.pages[partial[0]][self.partial_pool][0]
        s.num_computed = s.cached_tokens = cached
        s.out_reserved = out
        s.admitted_at = s.admitted_at or time.perf_counter()
        return pages

    def _grow(self) -> tuple[list[tuple[Seq, dict[str, list[int]]]], list[Seq]]:
        """Pages for the token each decoding sequence computes next, oldest first; when a pool is dry, the most
        recently admitted decoding sequence goes back to the queue until the rest fit."""
        grown, retracted = [], []
        for s in [s for s in self.running.values() if not s.prefilling]:
            while s.rid in self.running and self._outgrown(s):
                out, need = self._growth(s)
                pages = self.memory.grow(s.rid, need)
                if pages is not None:
                    s.out_reserved = out
                    grown.append((s, pages))
                    continue
                victim = next(
                    v for v in reversed(self.running.values()) if not v.prefilling
                )  # s itself at the latest
                self._retract(victim)
                retracted.append(victim)
        return [(s, p) for s, p in grown if s.rid in self.running], retracted

    @staticmethod
    def _outgrown(s: Seq) -> bool:
        """Whether a decoding sequence's next token lies past the answer tokens it reserved pages for."""
        return s.num_computed + 1 > s.prompt_len + s.out_reserved

    def _growth(self, s: Seq) -> tuple[int, dict[str, int]]:
        """A decoding sequence's next reservation of answer tokens, and the pages it adds in each pool."""
        out = min(s.end_len - s.prompt_len, s.out_reserved + self.reserve_output)
        old = self.layout.pages_needed(s.prompt_len, s.out_reserved)
        return out, {p: n - old[p] for p, n in self.layout.pages_needed(s.prompt_len, out).items()}

    def can_grow(self) -> bool:
        """Whether the next step gives every decoding sequence the pages of its next token without a retraction
        (the overlap schedule retracts only sequences whose tokens are all known)."""
        need: Counter[str] = Counter()
        for s in self.running.values():
            if not s.prefilling and self._outgrown(s):
                need.update(self._growth(s)[1])
        return self.memory.can_reserve(need)

    def _retract(self, s: Seq) -> None:
        """Back to the head of the queue with its pages freed; it returns with prompt and output as its prompt."""
        del self.running[s.rid]
        self.memory.release(s.rid)
        s.prompt_len, s.num_computed, s.cached_tokens = len(s.tokens), 0, 0
        s.out_reserved, s.partial_page, s.passed = 0, None, 0
        self._key(s)
        self.waiting.appendleft(s)
        self.num_retracted += 1

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
            # the whole conversation so far, a new list: seq.page_keys stays the prompt's
            turn = keys + more
            self.memory.cache(rid, turn, start=len(keys))
            self.recent_keys.remember(token_ids[: seq.num_computed], turn)
        self.waiting = deque(s for s in self.waiting if s.rid != rid)
        self.memory.release(rid)
