"""`full`: every layer's K/V in full precision in paged GPU memory — the SGLang/vLLM baseline."""
from __future__ import annotations

import torch

from ..kernels.attention import causal_attention
from .batch import ForwardBatch
from .pages import PoolSpec
from .policy import KVPolicy

PAGE_SIZE = 16


class FullPolicy(KVPolicy):
    name = "full"

    def _bytes_per_page(self) -> int:
        c = self.cfg
        return 2 * c.num_layers * PAGE_SIZE * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def pool_specs(self, gpu_bytes: int, host_bytes: int) -> list[PoolSpec]:
        bpp = self._bytes_per_page()
        return [PoolSpec("kv", "gpu", max(gpu_bytes // bpp, 1), PAGE_SIZE, bpp)]

    def pages_needed(self, prompt_len: int, max_new_tokens: int) -> dict[str, int]:
        return {"kv": -(-(prompt_len + max_new_tokens) // PAGE_SIZE)}

    def allocate_storage(self, specs: list[PoolSpec]) -> None:
        c, n = self.cfg, specs[0].num_pages
        shape = (c.num_layers, n * PAGE_SIZE, c.num_kv_heads, c.head_dim)
        self.k_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.page_tables: dict[int, torch.Tensor] = {}

    def add_request(self, rid: int, pages: dict[str, list[int]], prompt_len: int) -> None:
        self.page_tables[rid] = torch.tensor(pages["kv"], dtype=torch.long, device=self.device)

    def release(self, rid: int) -> None:
        self.page_tables.pop(rid, None)

    def slots(self, rid: int, begin: int, end: int) -> torch.Tensor:
        """Flat token slots of positions [begin, end) of request `rid`."""
        pos = torch.arange(begin, end, device=self.device)
        return self.page_tables[rid][pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE

    def prepare(self, batch: ForwardBatch) -> None:
        self._write = torch.cat([self.slots(r, s, s + n) for r, s, n in zip(batch.rids, batch.start, batch.new)])
        self._read = [self.slots(r, 0, s + n) for r, s, n in zip(batch.rids, batch.start, batch.new)]

    def attend(self, layer, q, k, v, batch: ForwardBatch) -> torch.Tensor:
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[self._write] = k
        vc[self._write] = v
        out = torch.empty_like(q)
        for i in range(batch.size):
            sl, slots = batch.seq(i), self._read[i]
            out[sl] = causal_attention(q[sl], kc[slots], vc[slots], batch.start[i])
        return out

    def kv_bytes(self) -> dict[str, int]:
        return {"gpu": 2 * self.k_cache.numel() * self.k_cache.element_size(), "host": 0}
