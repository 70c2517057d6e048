"""KV storage of TailorKV's sparsity-friendly ("S") layers: the prompt's full-precision K/V in the host tier,
sink + recent prompt tokens, max|K| and every generated token in the GPU tier.

Host layout per layer and 64-token page: token rows [H, 64, 2D] with a token's K and V of one KV head side by
side (what the top-k fetch reads: one 512-B row at D=128), and a channel-major copy of K [H, D, 64] (what
stage 1 reads, in long runs). On CUDA the host tensors are pinned.
"""
from __future__ import annotations

import torch

PAGE = 64


class OffloadState:
    def __init__(self, host_pages: torch.Tensor, gen_pages: torch.Tensor, slot: int, prompt_len: int,
                 sink: int, recent: int):
        self.host_pages, self.gen_pages, self.slot, self.prompt_len = host_pages, gen_pages, slot, prompt_len
        self.n_sink = min(sink, prompt_len)
        self.recent_begin = max(self.n_sink, prompt_len - recent)  # recent window: [recent_begin, prompt_len)
        self.n = 0

    @property
    def window_len(self) -> int:
        return self.n_sink + self.prompt_len - self.recent_begin


class OffloadStore:
    def __init__(self, num_layers: int, host_pages: int, gen_pages: int, num_slots: int, num_kv_heads: int,
                 head_dim: int, sink: int, recent: int, device, dtype):
        L, H, D = num_layers, num_kv_heads, head_dim
        self.h, self.d, self.device = H, D, device
        pin = torch.device(device).type == "cuda"
        host = dict(dtype=dtype, device="cpu", pin_memory=pin)
        self.rows = torch.empty(L, host_pages, H, PAGE, 2 * D, **host)
        self.k_t = torch.empty(L, host_pages, H, D, PAGE, **host)
        dev = dict(device=device, dtype=dtype)
        self.win_k = torch.empty(L, num_slots, sink + recent, H, D, **dev)
        self.win_v = torch.empty(L, num_slots, sink + recent, H, D, **dev)
        self.max_abs = torch.zeros(L, num_slots, H, D, device=device, dtype=torch.float32)
        self.gen_k = torch.empty(L, gen_pages * PAGE, H, D, **dev)
        self.gen_v = torch.empty(L, gen_pages * PAGE, H, D, **dev)

    @staticmethod
    def bytes_per_host_page(num_layers: int, h: int, d: int, itemsize: int) -> int:
        return num_layers * h * PAGE * 3 * d * itemsize

    @staticmethod
    def bytes_per_gen_page(num_layers: int, h: int, d: int, itemsize: int) -> int:
        return num_layers * PAGE * 2 * h * d * itemsize

    @staticmethod
    def bytes_per_slot(num_layers: int, h: int, d: int, window: int, itemsize: int) -> int:
        return num_layers * (2 * window * h * d * itemsize + h * d * 4)

    def prefill(self, layer: int, st: OffloadState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Offload a whole prompt's k, v [L, H, D]; keep sink + recent and max|K| per channel on the GPU."""
        n, np_ = k.shape[0], st.host_pages.numel()
        pad = np_ * PAGE - n
        kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(np_, PAGE, self.h, self.d).transpose(1, 2)
        vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(np_, PAGE, self.h, self.d).transpose(1, 2)
        hp = st.host_pages.cpu()
        self.rows[layer, hp] = torch.cat([kp, vp], dim=-1).to("cpu")
        self.k_t[layer, hp] = kp.transpose(2, 3).to("cpu")
        keep = torch.cat([torch.arange(st.n_sink), torch.arange(st.recent_begin, n)]).to(k.device)
        self.win_k[layer, st.slot, : keep.numel()] = k[keep]
        self.win_v[layer, st.slot, : keep.numel()] = v[keep]
        self.max_abs[layer, st.slot] = k.float().abs().amax(0)

    def _gen_slots(self, st: OffloadState, begin: int, end: int) -> torch.Tensor:
        pos = torch.arange(begin - st.prompt_len, end - st.prompt_len, device=st.gen_pages.device)
        return st.gen_pages[pos // PAGE] * PAGE + pos % PAGE

    def append(self, layer: int, st: OffloadState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one generated token's k, v [1, H, D] at position st.n (>= prompt_len)."""
        slot = self._gen_slots(st, st.n, st.n + 1)
        self.gen_k[layer, slot] = k
        self.gen_v[layer, slot] = v

    def critical_keys(self, layer: int, st: OffloadState, channels: torch.Tensor) -> torch.Tensor:
        """Stage-1 read: channels [H, d_s] of K for every prompt token -> [H, d_s, prompt_len] on the device."""
        hp = st.host_pages.cpu()[:, None, None]
        heads = torch.arange(self.h)[None, :, None]
        kc = self.k_t[layer, hp, heads, channels.cpu()[None]]  # [pages, H, d_s, 64]: only the chosen channels
        kc = kc.permute(1, 2, 0, 3).reshape(self.h, channels.shape[1], -1)[:, :, : st.prompt_len]
        return kc.to(self.device, non_blocking=True)

    def fetch_rows(self, layer: int, st: OffloadState, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k fetch: K, V [H, k, D] of prompt positions idx [H, k] (per KV head) from the host tier."""
        idx = idx.cpu()
        pages = st.host_pages.cpu()[idx // PAGE]  # [H, k]
        heads = torch.arange(self.h).unsqueeze(1)
        rows = self.rows[layer][pages, heads, idx % PAGE].to(self.device, non_blocking=True)  # [H, k, 2D]
        return rows[..., : self.d], rows[..., self.d:]

    def resident(self, layer: int, st: OffloadState, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [H, w + g, D]: the sink + recent window, then the generated tokens [prompt_len, n)."""
        w = st.window_len
        gen = self._gen_slots(st, st.prompt_len, n)
        k = torch.cat([self.win_k[layer, st.slot, :w], self.gen_k[layer, gen]]).transpose(0, 1)
        v = torch.cat([self.win_v[layer, st.slot, :w], self.gen_v[layer, gen]]).transpose(0, 1)
        return k, v

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.k_t))

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.win_k, self.win_v, self.max_abs, self.gen_k, self.gen_v))
