"""KV storage of TailorKV's sparsity-friendly ("S") layers: the prompt's full-precision K/V in the host tier,
sink + recent prompt tokens, max|K| and every generated token in the GPU tier.

Host layout per layer and 256-token page: token rows [H, 256, 2D] with a token's K and V of one KV head side by
side (what the top-k fetch reads: one 512-B row at D=128), and a channel-major copy of K [H, D, 256] (what
stage 1 reads: 512-B runs at bf16, which cross PCIe at ~49 GB/s where 128-B runs reach 15). On CUDA the host
tensors are pinned and the moves (host_copy) are GPU kernels reading and writing them through UVA; generated
tokens sit in the GPU tier in 64-token pages.
"""
from __future__ import annotations

import torch

from ..kernels import host_copy

HOST_PAGE = 256  # tokens per host-tier page
PAGE = 64  # tokens per generated-token page


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

    def gen_slots(self, begin: int, end: int) -> torch.Tensor:
        """GPU-tier slots of generated positions [begin, end) (positions count from the prompt's start)."""
        pos = torch.arange(begin - self.prompt_len, end - self.prompt_len, device=self.gen_pages.device)
        return self.gen_pages[pos // PAGE] * PAGE + pos % PAGE


def _pad(rows: list[torch.Tensor], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors of different lengths: (padded [B, max], valid mask [B, max])."""
    n = max(1, max(r.numel() for r in rows))
    out = torch.full((len(rows), n), value, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
        mask[i, : r.numel()] = True
    return out, mask


class DecodeView:
    """The decode rows of one step, padded into batch tensors (built once per step, read by every S layer)."""

    def __init__(self, states: list[OffloadState], window: int):
        dev = states[0].host_pages.device
        self.slots = torch.tensor([st.slot for st in states], device=dev)
        self.host_pages, _ = _pad([st.host_pages for st in states])
        self.mid_begin = torch.tensor([st.n_sink for st in states], device=dev)
        self.mid_end = torch.tensor([st.recent_begin for st in states], device=dev)
        self.win_mask = torch.arange(window, device=dev) < torch.tensor([st.window_len for st in states], device=dev)[:, None]
        self.gen_write = torch.cat([st.gen_slots(st.n, st.n + 1) for st in states])
        self.gen_read, self.gen_mask = _pad([st.gen_slots(st.prompt_len, st.n + 1) for st in states])


class OffloadStore:
    def __init__(self, num_layers: int, host_pages: int, gen_pages: int, num_slots: int, num_kv_heads: int,
                 head_dim: int, sink: int, recent: int, device, dtype, host_on_device: bool = False):
        L, H, D = num_layers, num_kv_heads, head_dim
        self.h, self.d, self.device, self.window = H, D, device, sink + recent
        # host_on_device: the "host" tier in device memory — the same math without PCIe (accuracy runs)
        self.storage = torch.device(device) if host_on_device else torch.device("cpu")
        pin = torch.device(device).type == "cuda" and not host_on_device
        host = dict(dtype=dtype, device=self.storage, pin_memory=pin)
        self.rows = torch.empty(L, host_pages, H, HOST_PAGE, 2 * D, **host)
        self.k_t = torch.empty(L, host_pages, H, D, HOST_PAGE, **host)
        self.ops = host_copy.ops(device)
        dev = dict(device=device, dtype=dtype)
        self.win_k = torch.empty(L, num_slots, sink + recent, H, D, **dev)
        self.win_v = torch.empty(L, num_slots, sink + recent, H, D, **dev)
        self.max_abs = torch.zeros(L, num_slots, H, D, device=device, dtype=torch.float32)
        self.gen_k = torch.empty(L, gen_pages * PAGE, H, D, **dev)
        self.gen_v = torch.empty(L, gen_pages * PAGE, H, D, **dev)

    @staticmethod
    def bytes_per_host_page(num_layers: int, h: int, d: int, itemsize: int) -> int:
        return num_layers * h * HOST_PAGE * 3 * d * itemsize

    @staticmethod
    def bytes_per_gen_page(num_layers: int, h: int, d: int, itemsize: int) -> int:
        return num_layers * PAGE * 2 * h * d * itemsize

    @staticmethod
    def bytes_per_slot(num_layers: int, h: int, d: int, window: int, itemsize: int) -> int:
        return num_layers * (2 * window * h * d * itemsize + h * d * 4)

    def prefill(self, layer: int, st: OffloadState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Offload a whole prompt's k, v [L, H, D]; keep sink + recent and max|K| per channel on the GPU."""
        n, np_ = k.shape[0], st.host_pages.numel()
        pad = np_ * HOST_PAGE - n
        kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(np_, HOST_PAGE, self.h, self.d).transpose(1, 2)
        vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(np_, HOST_PAGE, self.h, self.d).transpose(1, 2)
        src = torch.arange(np_, device=k.device)
        self.ops.copy_pages(torch.cat([kp, vp], dim=-1), src, self.rows[layer], st.host_pages)
        self.ops.copy_pages(kp.transpose(2, 3).contiguous(), src, self.k_t[layer], st.host_pages)
        keep = torch.cat([torch.arange(st.n_sink), torch.arange(st.recent_begin, n)]).to(k.device)
        self.win_k[layer, st.slot, : keep.numel()] = k[keep]
        self.win_v[layer, st.slot, : keep.numel()] = v[keep]
        self.max_abs[layer, st.slot] = k.float().abs().amax(0)

    def append(self, layer: int, view: DecodeView, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store each decode row's new k, v [B, H, D] among its generated tokens."""
        self.gen_k[layer, view.gen_write] = k
        self.gen_v[layer, view.gen_write] = v

    def critical_keys(self, layer: int, view: DecodeView, channels: torch.Tensor) -> torch.Tensor:
        """Stage-1 read: channels [B, H, d_s] of K for every prompt token -> [B, H, d_s, pages*64] on the device
        (positions past a row's prompt are padding; stage 2 never selects them)."""
        return self.ops.gather_channels(self.k_t[layer], view.host_pages, channels)

    def fetch_rows(self, layer: int, view: DecodeView, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k fetch: K, V [B, H, k, D] of prompt positions idx [B, H, k] from the host tier."""
        rows = self.ops.gather_rows(self.rows[layer], view.host_pages, idx)  # [B, H, k, 2D]
        return rows[..., : self.d], rows[..., self.d:]

    def resident(self, layer: int, view: DecodeView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V [B, H, W + G, D] and mask [B, H, W + G]: the sink + recent window, then the generated tokens
        (this step's included)."""
        k = torch.cat([self.win_k[layer, view.slots], self.gen_k[layer, view.gen_read]], dim=1).transpose(1, 2)
        v = torch.cat([self.win_v[layer, view.slots], self.gen_v[layer, view.gen_read]], dim=1).transpose(1, 2)
        mask = torch.cat([view.win_mask, view.gen_mask], dim=1)[:, None].expand(-1, self.h, -1)
        return k, v, mask

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.k_t))

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.win_k, self.win_v, self.max_abs, self.gen_k, self.gen_v))
