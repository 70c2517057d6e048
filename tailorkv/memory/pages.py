"""Page accounting for the KV memory tiers: no tensors here, only which page ids belong to which request.

A policy declares named pools (each in a tier: "gpu" or "host") and how many pages of each a request needs;
`MemoryManager.reserve` takes all of them or none, so a request is never half-admitted. With prefix caching some
pools are shared through a PrefixCache: a request may start with pages of an earlier one (see prefix_cache.py).
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

    def num_free_from(self, first: int) -> int:
        """Free ids >= first."""
        return sum(1 for x in self._free if x >= first)

    def alloc(self, n: int) -> list[int]:
        assert n <= len(self._free), f"pool {self.name}: {n} pages asked, {len(self._free)} free"
        pages = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
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
    # what each request holds pages for: "prompt", "output" or "all" tokens, one page ("request"), or None (no
    # request holds pages of it: the policy uses it itself)
    holds: str | None = None
    # the pool whose last num_pages ids these pages are (requests take them there), their bytes in this pool's tier
    part_of: str | None = None


class MemoryManager:
    """All pools of one engine and the pages each live request holds."""

    def __init__(self, specs: list[PoolSpec], prefix: tuple[int, dict[str, int]] | None = None):
        """`prefix`: (tokens per block, pages per block of each shared pool) when requests with a common prompt
        prefix share its pages (KVLayout.prefix_blocks), else None."""
        self.specs = {s.name: s for s in specs}
        self.pools = {s.name: PagePool(s.name, s.tier, s.num_pages, s.page_size) for s in specs}
        self.prefix: PrefixCache | None = None
        if prefix:
            tokens, per_block = prefix
            self.prefix = PrefixCache({p: self.pools[p] for p in per_block}, per_block, tokens)
        self.held: dict[int, dict[str, list[int]]] = {}
        self.blocks: dict[
            int, list[bytes]
        ] = {}  # cached blocks each request references (shared or registered)
        # how many of them each request shared at reserve: their pages lead its shared pools' lists
        self.num_shared: dict[int, int] = {}

    def _shared(self, pool: str) -> bool:
        return self.prefix is not None and pool in self.prefix.per_block

    def num_free(self, pool: str) -> int:
        """Pages of `pool` that can be allocated (free, or held only by an evictable cached block)."""
        return self.prefix.num_free(pool) if self._shared(pool) else self.pools[pool].num_free

    def fits_ever(self, need: dict[str, int]) -> bool:
        return all(n <= self.pools[p].num_pages for p, n in need.items())

    def can_reserve(self, need: dict[str, int]) -> bool:
        return all(n <= self.num_free(p) for p, n in need.items())

    def reserve(
        self, rid: int, need: dict[str, int], shared: list[bytes] = (), partial: bytes | None = None
    ) -> dict[str, list[int]] | None:
        """The pages for `rid`, or None (and nothing taken) when some pool lacks room. `shared`: cached blocks
        (PrefixCache.match) whose pages start the shared pools' lists; they count towards `need`. `partial`: a
        cached partial block the request reads from (PrefixCache.match_partial), referenced until it ends; its pages
        are not the request's (it writes that block into pages of its own, counted in `need`)."""
        fresh = dict(need)  # pages to allocate
        for p, m in self.prefix.per_block.items() if shared else ():
            fresh[p] -= len(shared) * m
        referenced = [*shared, *([partial] if partial else [])]
        room = {
            p: n + (self.prefix.evictable_pages(referenced, p) if self._shared(p) else 0)
            for p, n in fresh.items()
        }  # an evictable block it references is taken from the free pages
        if not self.can_reserve(room):
            return None
        held: dict[str, list[int]] = {p: [] for p in fresh}
        if referenced:  # shared before alloc, which could otherwise evict them
            held.update(self.prefix.share(shared))
            self.prefix.share([partial] if partial else [])
        for p, n in fresh.items():
            held[p] += self._alloc(p, n)
        self.held[rid], self.blocks[rid], self.num_shared[rid] = held, referenced, len(shared)
        return held

    def grow(self, rid: int, need: dict[str, int]) -> dict[str, list[int]] | None:
        """`need` more pages of each pool for `rid`, appended to its own; None (nothing taken) when some pool
        lacks room."""
        if not self.can_reserve(need):
            return None
        new = {p: self._alloc(p, n) for p, n in need.items() if n}
        for p, pages in new.items():
            self.held[rid][p] += pages
        return new

    def _alloc(self, pool: str, n: int) -> list[int]:
        """`n` free pages of `pool` (a shared pool's may come from evicted cached blocks)."""
        return self.prefix.alloc(pool, n) if self._shared(pool) else self.pools[pool].alloc(n)

    def cache(self, rid: int, keys: list[bytes], start: int = 0) -> None:
        """Register blocks start .. len(keys)-1 of `rid` (their K/V is computed and final) under `keys`."""
        if self.prefix and rid in self.held and len(keys) > start:
            pages = {
                p: self.held[rid][p][start * m : len(keys) * m]
                for p, m in self.prefix.per_block.items()
            }
            self.blocks[rid] += self.prefix.register(keys[start:], pages)

    def cache_partial(
        self, rid: int, parent: bytes, tokens: list[int], block: int, pool: str
    ) -> None:
        """Register the partly filled block `block` of `rid` (its first `tokens` are computed and final), its page
        in `pool` only, under `parent` (the key of the block before it)."""
        if self.prefix and rid in self.held:
            key = self.prefix.register_partial(
                parent, tokens, {pool: self.held[rid][pool][block : block + 1]}
            )
            if key is not None:
                self.blocks[rid].append(key)

    def release(self, rid: int) -> None:
        keys, n = self.blocks.pop(rid, []), self.num_shared.pop(rid, 0)
        # the shared blocks' pages lead each shared pool's list; of the rest, those registered since are cached
        owned = self.prefix.owned(keys[n:]) if keys else {}
        if keys:
            self.prefix.release(keys)
        for p, pages in self.held.pop(rid, {}).items():
            own = pages[n * self.prefix.per_block[p] :] if self._shared(p) else pages
            mine = owned.get(p)
            self.pools[p].free([x for x in own if x not in mine] if mine else own)

    def usage(self) -> dict[str, dict]:
        """Per tier: free and total pages and bytes (what /get_server_info and /metrics report); cached pages that
        no request holds count as free. A pool's last ids that another pool is part of count in that one's tier."""
        out: dict[str, dict] = {}

        def add(spec: PoolSpec, free: int, total: int) -> None:
            t = out.setdefault(
                spec.tier, {"free_pages": 0, "total_pages": 0, "free_bytes": 0, "total_bytes": 0}
            )
            t["free_pages"] += free
            t["total_pages"] += total
            t["free_bytes"] += free * spec.bytes_per_page
            t["total_bytes"] += total * spec.bytes_per_page

        parts = {s.part_of: s for s in self.specs.values() if s.part_of}
        for name, pool in self.pools.items():
            spec, free, total = self.specs[name], self.num_free(name), pool.num_pages
            if spec.part_of:  # counted with the pool it is part of
                continue
            if name in parts:
                part = parts[name]
                first = total - part.num_pages
                part_free = pool.num_free_from(first)
                if self._shared(name):
                    part_free += self.prefix.evictable_from(name, first)
                add(part, part_free, part.num_pages)
                free, total = free - part_free, first
            add(spec, free, total)
        return out
