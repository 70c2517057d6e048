"""Page accounting for the KV memory tiers: no tensors here, only which page ids belong to which request.

A policy declares named pools (each in a tier: "gpu" or "host") and how many pages of each a request needs;
`MemoryManager.reserve` takes all of them or none, so a request is never half-admitted. With prefix caching one
pool is a PrefixCache: a request may start with pages shared from an earlier one (see prefix_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .prefix_cache import PrefixCache


class PagePool:
    """A fixed set of page ids [0, num_pages); `alloc` hands out free ids, `free` returns them."""

    def __init__(self, name: str, tier: str, num_pages: int, page_size: int):
        self.name, self.tier, self.num_pages, self.page_size = name, tier, num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        assert n <= len(self._free), f"pool {self.name}: {n} pages asked, {len(self._free)} free"
        pages = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@dataclass
class PoolSpec:
    name: str
    tier: str  # "gpu" or "host"
    num_pages: int
    page_size: int  # tokens per page
    bytes_per_page: int


class MemoryManager:
    """All pools of one engine and the pages each live request holds."""

    def __init__(self, specs: list[PoolSpec], prefix_pool: str | None = None):
        """`prefix_pool`: the pool whose full pages are shared between requests with a common prefix (or None)."""
        self.specs = {s.name: s for s in specs}
        self.pools = {s.name: PagePool(s.name, s.tier, s.num_pages, s.page_size) for s in specs}
        self.prefix: PrefixCache | None = None
        if prefix_pool:
            self.prefix = self.pools[prefix_pool] = PrefixCache(self.pools[prefix_pool])
        self.held: dict[int, dict[str, list[int]]] = {}

    def fits_ever(self, need: dict[str, int]) -> bool:
        return all(n <= self.pools[p].num_pages for p, n in need.items())

    def can_reserve(self, need: dict[str, int]) -> bool:
        return all(n <= self.pools[p].num_free for p, n in need.items())

    def reserve(self, rid: int, need: dict[str, int], shared: list[int] = ()) -> dict[str, list[int]] | None:
        """The pages for `rid`, or None (and nothing taken) when some pool lacks room. `shared`: cached pages
        (PrefixCache.match) that start the prefix pool's list; they count towards `need`."""
        fresh, room = dict(need), dict(need)  # pages to allocate; room (free or evictable pages) taken
        if shared:
            name = self.prefix.name
            fresh[name] -= len(shared)
            room[name] = fresh[name] + self.prefix.num_evictable(shared)  # an evictable page counts as free
        if not self.can_reserve(room):
            return None
        held: dict[str, list[int]] = {p: [] for p in fresh}
        if shared:
            held[name] = self.prefix.share(shared)  # before alloc, which could otherwise evict them
        for p, n in fresh.items():
            held[p] += self.pools[p].alloc(n)
        self.held[rid] = held
        return self.held[rid]

    def cache(self, rid: int, keys: list[bytes], start: int = 0) -> None:
        """Register pages start .. len(keys)-1 of `rid` in the prefix pool (their K/V is computed) under `keys`."""
        if self.prefix and rid in self.held:
            self.prefix.register(self.held[rid][self.prefix.name][start:len(keys)], keys[start:])

    def release(self, rid: int) -> None:
        for p, pages in self.held.pop(rid, {}).items():
            self.pools[p].free(pages)

    def usage(self) -> dict[str, dict]:
        """Per tier: free and total pages and bytes (what /get_server_info and /metrics report); cached pages that
        no request holds count as free."""
        out: dict[str, dict] = {}
        for name, pool in self.pools.items():
            spec = self.specs[name]
            t = out.setdefault(spec.tier, {"free_pages": 0, "total_pages": 0, "free_bytes": 0, "total_bytes": 0})
            t["free_pages"] += pool.num_free
            t["total_pages"] += pool.num_pages
            t["free_bytes"] += pool.num_free * spec.bytes_per_page
            t["total_bytes"] += pool.num_pages * spec.bytes_per_page
        return out
