"""KV storage of TailorKV's quantization-friendly ("Q") layers, also the whole of the `kivi` baseline.

Per layer and request: K quantized per channel in 64-token pages for positions [0, kq), kq a multiple of
`residual`, the rest in a full-precision tail; V quantized per token for positions [0, n - residual), the last
`residual` tokens in a full-precision window. Prefill quantizes K in multiples of `residual` and all V but the
last `residual` tokens; each decode step appends to the K tail (quantized as one block when it reaches
`residual`) and slides the V window (the oldest token beyond it is quantized). Paper §2, KIVI's rules.
"""
from __future__ import annotations

import torch

from ..kernels import kivi
from .tailor_config import TailorConfig

PAGE = 64  # tokens per quantized page = one K quantization group


class QuantState:
    """Per request: its quantized pages, its window slot, and how many tokens are quantized / cached."""

    def __init__(self, pages: torch.Tensor, slot: int):
        self.pages, self.slot = pages, slot
        self.n = 0  # tokens cached
        self.kq = 0  # K tokens quantized (a multiple of residual)

    def after(self, n: int, residual: int) -> tuple[int, int]:
        """(n, kq) once the step that brings the cache to n tokens has been stored."""
        if self.n == 0:  # prefill quantizes K in multiples of residual
            return n, n - n % residual
        if n - self.kq == residual:  # the decode tail just filled up and was quantized
            return n, n
        return n, self.kq

    def advance(self, n: int, residual: int) -> None:
        """After every Q layer stored the step's tokens: the request now caches n tokens."""
        self.n, self.kq = self.after(n, residual)


class QuantStore:
    """Packed K/V pages for `num_layers` Q layers plus full-precision tails in per-request window slots."""

    def __init__(self, num_layers: int, num_pages: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 cfg: TailorConfig, device, dtype):
        self.cfg, self.h, self.d, self.bits = cfg, num_kv_heads, head_dim, cfg.quant_bits
        self.vgroup = kivi.value_group(cfg.group_size, head_dim, self.bits)
        self.ops = kivi.ops(device)
        L, P, H, D, b = num_layers, num_pages, num_kv_heads, head_dim, self.bits
        i32, f16 = dict(device=device, dtype=torch.int32), dict(device=device, dtype=torch.float16)
        self.k_packed = torch.empty(L, P, H, PAGE * b // 32, D, **i32)
        self.k_scale = torch.empty(L, P, H, D, **f16)
        self.k_zero = torch.empty(L, P, H, D, **f16)
        self.v_packed = torch.empty(L, P * PAGE, H, D * b // 32, **i32)
        self.v_scale = torch.empty(L, P * PAGE, H, D // self.vgroup, **f16)
        self.v_zero = torch.empty(L, P * PAGE, H, D // self.vgroup, **f16)
        r = cfg.residual
        self.k_tail = torch.empty(L, num_slots, r, H, D, device=device, dtype=dtype)
        self.v_win = torch.empty(L, num_slots, r + 1, H, D, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_page(num_layers: int, h: int, d: int, bits: int, vgroup: int) -> int:
        k = h * (PAGE * bits // 32) * d * 4 + 2 * h * d * 2
        v = PAGE * h * (d * bits // 32) * 4 + 2 * PAGE * h * (d // vgroup) * 2
        return num_layers * (k + v)

    @staticmethod
    def bytes_per_slot(num_layers: int, h: int, d: int, residual: int, itemsize: int) -> int:
        return num_layers * (2 * residual + 1) * h * d * itemsize

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    # ---- writing ----------------------------------------------------------------------------------------------
    def _quantize_k(self, layer: int, st: QuantState, k: torch.Tensor, begin: int) -> None:
        """k [m*64, H, D] at positions [begin, begin + m*64) -> packed pages."""
        m = k.shape[0] // PAGE
        x = k.view(m, PAGE, self.h, self.d).transpose(1, 2).reshape(m * self.h, PAGE, self.d)
        q = self.ops.quantize_keys(x, self.bits, PAGE)
        pages = st.pages[begin // PAGE: begin // PAGE + m]
        self.k_packed[layer, pages] = q.packed.view(m, self.h, -1, self.d)
        self.k_scale[layer, pages] = q.scale.view(m, self.h, self.d)
        self.k_zero[layer, pages] = q.zero.view(m, self.h, self.d)

    def _quantize_v(self, layer: int, st: QuantState, v: torch.Tensor, begin: int) -> None:
        """v [m, H, D] at positions [begin, begin + m) -> packed per-token rows."""
        m = v.shape[0]
        q = self.ops.quantize_values(v.reshape(1, m * self.h, self.d), self.bits, self.vgroup)
        slots = self._token_slots(st, begin, begin + m)
        self.v_packed[layer, slots] = q.packed.view(m, self.h, -1)
        self.v_scale[layer, slots] = q.scale.view(m, self.h, -1)
        self.v_zero[layer, slots] = q.zero.view(m, self.h, -1)

    def _token_slots(self, st: QuantState, begin: int, end: int) -> torch.Tensor:
        pos = torch.arange(begin, end, device=st.pages.device)
        return st.pages[pos // PAGE] * PAGE + pos % PAGE

    def prefill(self, layer: int, st: QuantState, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Store a whole prompt's k, v [n, H, D] of one layer; the pages of tokens before `start` (a multiple of
        64, at most n - residual) are shared with an earlier request and already hold them."""
        n, r = k.shape[0], self.cfg.residual
        kq, vq = n - n % r, max(n - r, 0)
        if kq > start:
            self._quantize_k(layer, st, k[start:kq], start)
        if vq > start:
            self._quantize_v(layer, st, v[start:vq], start)
        self.k_tail[layer, st.slot, : n - kq] = k[kq:]
        self.v_win[layer, st.slot, : n - vq] = v[vq:]

    def append(self, layer: int, st: QuantState, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one decode token's k, v [1, H, D] at position st.n (the request's counts move in `advance`)."""
        r, tail = self.cfg.residual, st.n - st.kq
        self.k_tail[layer, st.slot, tail] = k[0]
        if tail + 1 == r:
            self._quantize_k(layer, st, self.k_tail[layer, st.slot, :r], st.kq)
        w = st.n - max(st.n - r, 0)  # tokens in the V window before this one
        self.v_win[layer, st.slot, w] = v[0]
        if w + 1 > r:
            self._quantize_v(layer, st, self.v_win[layer, st.slot, :1], st.n - r)
            self.v_win[layer, st.slot, :r] = self.v_win[layer, st.slot, 1:r + 1].clone()

    # ---- reading ----------------------------------------------------------------------------------------------
    def dequantized(self, layer: int, st: QuantState, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, H, D] of the request as attention sees them (dequantized part + full-precision tails),
        including the token appended in the current step."""
        r = self.cfg.residual
        n, kq = st.after(st.n + 1, r)
        vq = max(n - r, 0)
        ks, vs = [], []
        if kq:
            pages = st.pages[: kq // PAGE]
            m = pages.numel()
            qk = kivi.QuantizedKeys(self.k_packed[layer, pages].view(m * self.h, -1, self.d),
                                    self.k_scale[layer, pages].view(m * self.h, 1, self.d),
                                    self.k_zero[layer, pages].view(m * self.h, 1, self.d))
            deq = self.ops.dequantize_keys(qk, self.bits, PAGE, PAGE, dtype)
            ks.append(deq.view(m, self.h, PAGE, self.d).transpose(1, 2).reshape(kq, self.h, self.d))
        ks.append(self.k_tail[layer, st.slot, : n - kq].to(dtype))
        if vq:
            slots = self._token_slots(st, 0, vq)
            qv = kivi.QuantizedValues(self.v_packed[layer, slots].view(1, vq * self.h, -1),
                                      self.v_scale[layer, slots].view(1, vq * self.h, -1),
                                      self.v_zero[layer, slots].view(1, vq * self.h, -1))
            vs.append(self.ops.dequantize_values(qv, self.bits, self.vgroup, dtype).view(vq, self.h, self.d))
        vs.append(self.v_win[layer, st.slot, : n - vq].to(dtype))
        return torch.cat(ks), torch.cat(vs)

    def decode_attention(self, layer: int, st: QuantState, q: torch.Tensor) -> torch.Tensor:
        """q [1, Hq, D] of the newest token (already appended) over all n cached tokens, by the fused kernel:
        tokens [0, vq) where both K and V are quantized are read packed; the rest is its full-precision residual
        (K's last quantized block past vq, fewer than `residual` tokens, dequantized, then the K tail; the V
        window)."""
        r = self.cfg.residual
        n, kq = st.after(st.n + 1, r)
        vq = max(n - r, 0)
        m = -(-vq // PAGE)
        pages = st.pages[:m]
        qk = kivi.QuantizedKeys(self.k_packed[layer, pages].transpose(0, 1).reshape(self.h, -1, self.d),
                                self.k_scale[layer, pages].transpose(0, 1), self.k_zero[layer, pages].transpose(0, 1))
        slots = self._token_slots(st, 0, vq)
        qv = kivi.QuantizedValues(*(x[layer, slots].transpose(0, 1) for x in (self.v_packed, self.v_scale, self.v_zero)))
        first = vq // PAGE  # the quantized K pages holding [vq, kq)
        k_mid = self.ops.dequantize_keys(
            kivi.QuantizedKeys(*(x[layer, st.pages[first:kq // PAGE]].transpose(0, 1).reshape(self.h, -1, self.d)
                                 for x in (self.k_packed, self.k_scale, self.k_zero))),
            self.bits, PAGE, kq - first * PAGE, q.dtype)[:, vq - first * PAGE:]
        k_res = torch.cat([k_mid, self.k_tail[layer, st.slot, : n - kq].transpose(0, 1).to(q.dtype)], 1)
        v_res = self.v_win[layer, st.slot, : n - vq].transpose(0, 1)
        out, _ = self.ops.quantized_decode_attention(q[0], qk, qv, vq, self.bits, PAGE, k_res, v_res,
                                                     self.d ** -0.5)
        return out.to(q.dtype)[None]
