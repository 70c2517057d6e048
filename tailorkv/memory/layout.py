"""A KV policy's memory contract (KVLayout): the pools it needs in each tier and what a request costs in them. The
scheduler and the MemoryManager read only this, never the policy's attention code."""

from __future__ import annotations

from dataclasses import dataclass

from .pages import PoolSpec


@dataclass(frozen=True)
class KVLayout:
    """- pools: every pool of the policy, sized to the engine's byte budgets; a pool's `holds` says what a request
      reserves in it (pages_needed);
    - prefix_blocks: (tokens per block, pages per block in each shared pool) when requests with a common prompt
      prefix share its pages (prefix_cache.py), block i holding tokens i*tokens ..; None when they do not;
    - caches_output: generated tokens' K/V sits in the same pages as the prompt's, so a finished request's output
      may be cached for the next turn of a chat;
    - partial_block_pool: with prefix blocks, the pool of a prompt's partly filled last block's page that holds
      its tokens' exact K/V, cached for a request continuing them; None: only full blocks are cached."""

    pools: list[PoolSpec]
    prefix_blocks: tuple[int, dict[str, int]] | None = None
    caches_output: bool = True
    partial_block_pool: str | None = None

    def pages_needed(self, prompt_len: int, max_new_tokens: int) -> dict[str, int]:
        """Pages of each pool a request of `prompt_len` prompt tokens and `max_new_tokens` answer tokens holds."""
        tokens = {"prompt": prompt_len, "output": max_new_tokens}
        tokens["all"] = prompt_len + max_new_tokens
        return {
            s.name: 1 if s.holds == "request" else -(-tokens[s.holds] // s.page_size)
            for s in self.pools
            if s.holds
        }

    def max_prompt(self, max_new_tokens: int) -> int:
        """The longest prompt whose request, with `max_new_tokens` answer tokens, the pools could ever hold (0:
        none)."""
        room = {"prompt": 0, "all": max_new_tokens}
        if self.max_output(0) < max_new_tokens:
            return 0
        return min(
            (s.num_pages * s.page_size - room[s.holds] for s in self.pools if s.holds in room),
            default=1 << 62,
        )

    def max_output(self, prompt_len: int) -> int:
        """The most answer tokens the pools could ever hold pages for after a prompt of `prompt_len` tokens."""
        room = {"output": 0, "all": prompt_len}
        return min(
            (s.num_pages * s.page_size - room[s.holds] for s in self.pools if s.holds in room),
            default=1 << 62,
        )
