"""Prefix caching: requests whose prompts start alike share the K/V pages of that prefix, by reference count.

A policy shares prompts in blocks of `block_tokens` tokens; a block owns a fixed number of pages in each shared
pool (`full`: one 16-token page; `tailor`: one 256-token host-tier page, one key-sketch page and four 64-token
quantized pages). Each block is keyed by a hash chain over the token ids (a block's key covers its own tokens
and, through its parent's key, every token before it, so equal keys mean equal K/V at equal positions). Only
blocks the policy never writes again are registered.

A policy may also cache a prompt's partly filled last block (KVLayout.partial_block_pool; tailor): only its page
in that pool, which holds the exact K/V of its tokens, under its parent's key and its tokens. A request whose prompt
continues those tokens (a chat's next turn) shares the full blocks before it, reads the partial block's tokens from
that page and computes from after them, writing the block into pages of its own: copy-on-write, so a partial block
never changes once cached. A block nobody references stays cached, evictable in LRU order; allocation takes free
pages first, then evicts whole blocks. Accounting only: no tensors here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

ROOT = b""  # the parent key of a prompt's first block


def page_hashes(token_ids: list[int], block_tokens: int, parent: bytes = ROOT) -> list[bytes]:
    """Keys of the full blocks of `token_ids` (a trailing partial block gets none), chained from `parent`.
    SHA-256, so a collision (another user's prefix served as yours) is out of reach, unlike Python's hash()."""
    keys = []
    for i in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        parent = hashlib.sha256(
            parent + array("q", token_ids[i : i + block_tokens]).tobytes()
        ).digest()
        keys.append(parent)
    return keys


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common (list slices compare in C: bisection, not a loop)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RecentKeys:
    """page_hashes that copies the keys of a recent prompt's common start instead of hashing it again: a chat's
    next turn, or another user's question about the same document, repeats thousands of blocks (a 64k-token prompt
    in 16-token blocks: ~6 ms of SHA-256 in the engine's thread, each request). One remembered prompt per first
    block, the `size` most recent."""

    def __init__(self, block_tokens: int, size: int = 16):
        self.block_tokens, self.size = block_tokens, size
        self.recent: OrderedDict[bytes, tuple[list[int], list[bytes]]] = OrderedDict()

    def keys(self, tokens: list[int]) -> list[bytes]:
        """page_hashes(tokens, block_tokens), remembered; `tokens` is kept: the caller must not change it."""
        b = self.block_tokens
        first = page_hashes(tokens[:b], b)
        if not first:
            return []
        known = self.recent.get(first[0])  # its first block is this one's: n >= 1
        n = common_prefix(tokens, known[0]) // b if known else 1
        head = known[1][:n] if known else first
        keys = head + page_hashes(tokens[n * b :], b, head[-1])
        self.remember(tokens, keys)
        return keys

    def remember(self, tokens: list[int], keys: list[bytes]) -> None:
        """The keys of `tokens`' full blocks (kept, as `keys` keeps them) for the next prompts that begin alike."""
        if keys:
            self.recent[keys[0]] = (tokens, keys)
            self.recent.move_to_end(keys[0])
            if len(self.recent) > self.size:
                self.recent.popitem(last=False)


class PrefixCache:
    """Cached blocks over the shared pools (PagePools: alloc, free, num_free): their pages, reference counts and
    LRU order. `num_free(pool)` counts free pages and those of evictable blocks: both can be allocated."""

    def __init__(self, pools: dict, per_block: dict[str, int], block_tokens: int):
        self.pools, self.per_block, self.block_tokens = pools, per_block, block_tokens
        self.pages: dict[
            bytes, dict[str, list[int]]
        ] = {}  # key -> the block's pages in each shared pool
        self.refs: dict[bytes, int] = {}  # key -> live requests referencing the block
        self.evictable: OrderedDict[bytes, None] = (
            OrderedDict()
        )  # cached blocks with no reference, oldest first
        self._evictable_pages = dict.fromkeys(
            per_block, 0
        )  # pages of the evictable blocks, per pool
        self.partials: dict[
            bytes, dict[bytes, tuple[int, ...]]
        ] = {}  # parent key -> partial blocks: key -> tokens
        self._parent: dict[bytes, bytes] = {}  # a partial block's key -> its parent key

    def num_free(self, pool: str) -> int:
        return self.pools[pool].num_free + self._evictable_pages[pool]

    def _set_evictable(self, key: bytes, evictable: bool) -> None:
        if evictable == (key in self.evictable):
            return
        if evictable:
            self.evictable[key] = None
        else:
            del self.evictable[key]
        for p, pages in self.pages[key].items():
            self._evictable_pages[p] += len(pages) if evictable else -len(pages)

    def match(self, keys: list[bytes]) -> list[bytes]:
        """The longest cached prefix of `keys`: the chain stops at the first key not cached."""
        hit = []
        for key in keys:
            if key not in self.pages:
                break
            hit.append(key)
        return hit

    def match_partial(self, parent: bytes, tokens: list[int]) -> tuple[bytes, int] | None:
        """The partial block under `parent` whose tokens begin `tokens` longest: (its key, the tokens in common, at
        most len(tokens)), or None when none shares a first token."""
        best = None
        for key, cached in self.partials.get(parent, {}).items():
            n = next(
                (i for i, (a, b) in enumerate(zip(cached, tokens)) if a != b),
                min(len(cached), len(tokens)),
            )
            if n and (best is None or n > best[1]):
                best = (key, n)
        return best

    def evictable_from(self, pool: str, first: int) -> int:
        """Pages of `pool` with ids >= first in evictable blocks."""
        return sum(sum(x >= first for x in self.pages[k].get(pool, ())) for k in self.evictable)

    def evictable_pages(self, keys: list[bytes], pool: str) -> int:
        return sum(len(self.pages[k].get(pool, ())) for k in keys if k in self.evictable)

    def share(self, keys: list[bytes]) -> dict[str, list[int]]:
        """Take a reference on cached blocks (from `match`), which stop being evictable; their pages per pool."""
        refs, pages = self.refs, self.pages
        for k in keys:
            n = refs.get(k, 0)
            refs[k] = n + 1
            if not n:  # only an unreferenced block can be evictable
                self._set_evictable(k, False)
        return {p: [x for k in keys for x in pages[k].get(p, ())] for p in self.per_block}

    def alloc(self, pool: str, n: int) -> list[int]:
        """`n` pages of `pool`: free ones first, then those of the least recently used evictable blocks (an evicted
        block returns its pages in every pool)."""
        free = self.pools[pool]
        got = free.alloc(min(n, free.num_free))
        while len(got) < n:
            assert self.evictable, f"pool {pool}: {n} pages asked, {len(got)} free or evictable"
            self._evict(next(iter(self.evictable)))
            got += free.alloc(min(n - len(got), free.num_free))
        return got

    def flush(self) -> int:
        """Evict every block no request references (/flush_cache); returns how many."""
        n = len(self.evictable)
        while self.evictable:
            self._evict(next(iter(self.evictable)))
        return n

    def _evict(self, key: bytes) -> None:
        """Forget an evictable block and return its pages in every pool."""
        self._set_evictable(key, False)
        for p, pages in self.pages.pop(key).items():
            self.pools[p].free(pages)
        parent = self._parent.pop(key, None)
        if parent is not None:
            del self.partials[parent][key]
            if not self.partials[parent]:
                del self.partials[parent]

    def register(self, keys: list[bytes], pages: dict[str, list[int]]) -> list[bytes]:
        """Make computed blocks findable under their keys; `pages` holds their pages per pool, block after block.
        Returns the keys registered, each now referenced once by the caller. A key already cached keeps its block
        (the caller's copy stays private and goes free when its request ends)."""
        added = []
        for i, key in enumerate(keys):
            if key not in self.pages:
                self.pages[key] = {
                    p: pages[p][i * m : (i + 1) * m] for p, m in self.per_block.items()
                }
                self.refs[key] = 1
                added.append(key)
        return added

    def register_partial(
        self, parent: bytes, tokens: list[int], pages: dict[str, list[int]]
    ) -> bytes | None:
        """Make a computed partial block findable under its parent's key and its tokens (`pages`: its page in the
        partial pool); returns its key, now referenced once by the caller, or None when it is cached already."""
        key = hashlib.sha256(b"partial" + parent + array("q", tokens).tobytes()).digest()
        if key in self.pages:
            return None
        self.pages[key], self.refs[key], self._parent[key] = pages, 1, parent
        self.partials.setdefault(parent, {})[key] = tuple(tokens)
        return key

    def release(self, keys: list[bytes]) -> None:
        """Drop one reference from each block; an unreferenced block becomes evictable. The tail of a prefix is
        released first, so it is evicted before the head that leads to it."""
        refs = self.refs
        for k in reversed(keys):
            if refs[k] == 1:
                del refs[k]
                self._set_evictable(k, True)
            else:
                refs[k] -= 1

    def owned(self, keys: list[bytes]) -> dict[str, set[int]]:
        """The pages of these cached blocks, per pool."""
        return {p: {x for k in keys for x in self.pages[k].get(p, ())} for p in self.per_block}
