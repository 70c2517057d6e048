"""Prefix caching: requests whose prompts start alike share the K/V pages of that prefix, by reference count.

Only full pages are shared, each keyed by a hash chain over the token ids (a page's key covers its own tokens and,
through its parent's key, every token before it, so equal keys mean equal K/V at equal positions). A request's
partially filled last page is always its own and shared pages are never written again (the next token goes to a
later, private page), so no copy-on-write is needed. A page nobody references stays cached, evictable in LRU
order; allocation takes never-used or freed pages first, then evicts. Accounting only: no tensors here.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

ROOT = b""  # the parent key of a prompt's first page


def page_hashes(token_ids: list[int], page_size: int, parent: bytes = ROOT) -> list[bytes]:
    """Keys of the full pages of `token_ids` (a trailing partial page gets none), chained from `parent`.
    SHA-256, so a collision (another user's prefix served as yours) is out of reach, unlike Python's hash()."""
    keys = []
    for i in range(0, len(token_ids) - page_size + 1, page_size):
        parent = hashlib.sha256(parent + array("q", token_ids[i:i + page_size]).tobytes()).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """A PagePool (same interface: alloc, free, num_free, num_pages) whose pages carry reference counts and may
    be registered under a prefix key. `num_free` counts free and evictable pages: both can be allocated."""

    def __init__(self, pool):
        self.pool = pool
        self.name, self.tier, self.num_pages, self.page_size = pool.name, pool.tier, pool.num_pages, pool.page_size
        self.refs: dict[int, int] = {}  # page -> live requests holding it
        self.key_of: dict[int, bytes] = {}  # cached page -> its key
        self.page_of: dict[bytes, int] = {}  # key -> cached page
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached pages with no reference, oldest first

    @property
    def num_free(self) -> int:
        return self.pool.num_free + len(self.evictable)

    def match(self, keys: list[bytes]) -> list[int]:
        """Cached pages of the longest prefix of `keys`: the chain stops at the first key not cached."""
        pages = []
        for key in keys:
            if key not in self.page_of:
                break
            pages.append(self.page_of[key])
        return pages

    def num_evictable(self, pages: list[int]) -> int:
        return sum(p in self.evictable for p in pages)

    def share(self, pages: list[int]) -> list[int]:
        """Take a reference on cached pages (from `match`); they stop being evictable."""
        for p in pages:
            self.refs[p] = self.refs.get(p, 0) + 1
            self.evictable.pop(p, None)
        return list(pages)

    def alloc(self, n: int) -> list[int]:
        """`n` private pages, each with one reference: free ones first, then the least recently used cached ones."""
        assert n <= self.num_free, f"pool {self.name}: {n} pages asked, {self.num_free} free or evictable"
        pages = self.pool.alloc(min(n, self.pool.num_free))
        while len(pages) < n:
            p, _ = self.evictable.popitem(last=False)
            del self.page_of[self.key_of.pop(p)]
            pages.append(p)
        for p in pages:
            self.refs[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference from each page; an unreferenced cached page becomes evictable, others go free.
        The tail of a prefix is released first, so it is evicted before the head that leads to it."""
        unused = []
        for p in reversed(pages):
            self.refs[p] -= 1
            if self.refs[p] == 0:
                del self.refs[p]
                if p in self.key_of:
                    self.evictable[p] = None
                else:
                    unused.append(p)
        self.pool.free(unused)

    def register(self, pages: list[int], keys: list[bytes]) -> None:
        """Make computed full pages findable under their keys; a key already cached keeps its page (the other
        copy stays private and goes free when its request ends)."""
        for p, key in zip(pages, keys):
            if key not in self.page_of and p not in self.key_of:
                self.page_of[key], self.key_of[p] = p, key
