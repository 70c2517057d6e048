"""KIVI-style asymmetric min/max KV quantization (TailorKV §2): the plain-torch reference.

Per group: zero z = min, scale s = (max - min) / (2^b - 1), code q = clamp(round((x - z) / s), 0, 2^b - 1),
dequantized x' = q * s + z, with b in {1, 2, 4} and `group` a power of two >= 32. Scale and zero are stored as
float16 and the codes are taken against those stored values, so |x - x'| <= s/2 up to fp16 rounding of s and z.
A constant group (s == 0) gets code 0 and dequantizes to z. round() is round-half-up (floor(y + 0.5)).
Inputs must lie within the float16 range.

Layouts (N is any flattened leading dims: heads, or pages * heads); codes are packed 32/b per int32, LSB first:
- keys k [N, T, D], grouped per channel over `group` consecutive tokens, packed along tokens:
  packed [N, ceil(T / (32/b)), D] (word w of channel c holds tokens w*32/b ...), scale/zero [N, ceil(T/group), D].
  T need not divide anything: the last group is partial and padded codes are zero.
- values v [N, T, D], grouped per token over min(group, D) consecutive channels, packed along channels:
  packed [N, T, D*b/32], scale/zero [N, T, D / min(group, D)]; D must be a multiple of 32.

kivi_triton.py implements the same functions with the same signatures and bit-identical quantization;
`ops(device)` picks one.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention import grouped_attention
from .dispatch import pick

BITS = (1, 2, 4)


class QuantizedKeys(NamedTuple):
    packed: torch.Tensor  # [N, ceil(T / (32/b)), D] int32
    scale: torch.Tensor  # [N, ceil(T / group), D] float16
    zero: torch.Tensor  # [N, ceil(T / group), D] float16


class QuantizedValues(NamedTuple):
    packed: torch.Tensor  # [N, T, D * b / 32] int32
    scale: torch.Tensor  # [N, T, D / group] float16
    zero: torch.Tensor  # [N, T, D / group] float16


def codes_per_word(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 32 // bits


def check_group(bits: int, group: int) -> None:
    """Raise unless `group` is a power of two >= 32, so a group holds whole int32 words of codes at any width
    (the Triton kernels tile by word and by group)."""
    codes_per_word(bits)
    if group < 32 or group & (group - 1):
        raise ValueError(f"group must be a power of two >= 32, got {group}")


def value_group(group: int, head_dim: int, bits: int) -> int:
    """The channel group actually used for values: min(group, head_dim), validated."""
    group = min(group, head_dim)
    check_group(bits, group)
    if head_dim % 32 or head_dim % group:
        raise ValueError(
            f"head_dim {head_dim} must be a multiple of 32 and of the value group {group}"
        )
    return group


def ops(device: torch.device | str) -> ModuleType:
    """The kernel module for `device`: kivi_triton on CUDA when triton imports, else this torch reference.
    Both expose quantize_keys, dequantize_keys, quantize_values, dequantize_values and
    paged_decode_attention with identical signatures and layouts."""
    return pick(device, "kivi_triton", sys.modules[__name__])


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    # times the fp32 reciprocal, not divided: torch on CUDA divides by a scalar that way, so all paths agree
    return ((hi - lo) * (1.0 / (2**bits - 1))).half(), lo.half()


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s, z = scale.float(), zero.float()
    y = torch.where(s > 0, (x - z) / torch.where(s > 0, s, 1.0), 0.0)
    return torch.floor(y + 0.5).clamp(0, 2**bits - 1).to(torch.int32)


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack int32 codes along `dim` (length a multiple of 32/b) into int32 words, LSB first."""
    per = 32 // bits
    c = codes.movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per).long()
    words = (c << (bits * torch.arange(per, device=c.device))).sum(-1)
    words = torch.where(
        words >= 2**31, words - 2**32, words
    )  # the top code lands in the int32 sign bit
    return words.to(torch.int32).movedim(-1, dim)


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    w = packed.movedim(dim, -1).unsqueeze(-1)
    codes = (w >> (bits * torch.arange(per, device=w.device, dtype=torch.int32))) & (2**bits - 1)
    return codes.flatten(-2).movedim(-1, dim)


def quantize_keys(k: torch.Tensor, bits: int, group: int = 64) -> QuantizedKeys:
    """k [N, T, D] (any float dtype) -> per-channel codes over token groups, in the key layout above."""
    check_group(bits, group)
    n, t, d = k.shape
    words, g = -(-t // (32 // bits)), -(-t // group)
    x = F.pad(k.float(), (0, 0, 0, g * group - t)).view(n, g, group, d)
    valid = (torch.arange(g * group, device=k.device) < t).view(1, g, group, 1)
    scale, zero = _scale_zero(
        torch.where(valid, x, torch.inf).amin(2), torch.where(valid, x, -torch.inf).amax(2), bits
    )
    codes = torch.where(valid, _codes(x, scale[:, :, None], zero[:, :, None], bits), 0)
    codes = codes.view(n, g * group, d)[:, : words * (32 // bits)]
    return QuantizedKeys(_pack(codes, bits, 1), scale, zero)


def dequantize_keys(
    qk: QuantizedKeys, bits: int, group: int, num_tokens: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The first `num_tokens` keys of `qk` as [N, num_tokens, D] in `dtype` (extra stored tokens are ignored)."""
    check_group(bits, group)
    codes = _unpack(qk.packed, bits, 1)
    g = num_tokens // group
    if num_tokens == g * group and num_tokens <= codes.shape[1] and g <= qk.scale.shape[1]:
        # whole groups: each group's scale and zero broadcast over its tokens, the same products and sums as
        # repeat_interleave's copies below (element for element, and the same contiguous result) without them
        c = codes[:, :num_tokens].unflatten(1, (g, group))
        keys = c * qk.scale[:, :g, None].float() + qk.zero[:, :g, None].float()
        return keys.flatten(1, 2).to(dtype)
    codes = codes[:, :num_tokens]
    scale = qk.scale.float().repeat_interleave(group, 1)[:, :num_tokens]
    zero = qk.zero.float().repeat_interleave(group, 1)[:, :num_tokens]
    return (codes * scale + zero).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int = 64) -> QuantizedValues:
    """v [N, T, D] (any float dtype) -> per-token codes over channel groups, in the value layout above."""
    n, t, d = v.shape
    group = value_group(group, d, bits)
    x = v.float().reshape(n, t, d // group, group)
    scale, zero = _scale_zero(x.amin(-1), x.amax(-1), bits)
    codes = _codes(x, scale[..., None], zero[..., None], bits).view(n, t, d)
    return QuantizedValues(_pack(codes, bits, -1), scale, zero)


def dequantize_values(
    qv: QuantizedValues, bits: int, group: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """All stored values of `qv` as [N, T, D] in `dtype`."""
    codes = _unpack(qv.packed, bits, -1)
    group = value_group(group, codes.shape[-1], bits)
    scale = qv.scale.float().repeat_interleave(group, -1)
    zero = qv.zero.float().repeat_interleave(group, -1)
    return (codes * scale + zero).to(dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_packed: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_packed: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_tail: torch.Tensor,
    v_win: torch.Tensor,
    pages: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    bits: int,
    sm_scale: float,
    *,
    members: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode query per sequence over its paged KIVI cache: q [B, Hq, D] -> out [B, Hq, D] float32.

    Pages hold `page` = 32/b * W tokens (one K group). K: k_packed [P, H, W, D] (packed along tokens, per channel),
    k_scale/k_zero [P, H, D]; V per token slot (page * `page` + offset): v_packed [P * page, H, D*b/32],
    v_scale/v_zero [P * page, H, D / vgroup]. Full-precision tails per window slot: k_tail [S, R, H, D],
    v_win [S, R', H, D] (a ring: token t at t % R'). Row b has pages[b] (page table), slots[b] and lengths[b] =
    (n, kq, vq): n >= 1 tokens; token t takes K from its page if t < kq (a multiple of `page`), else
    k_tail[slot, t - kq]; V from its page if t < vq, else v_win[slot, t % R']. Query head h reads KV head
    h // (Hq // H). members [B, G] (row ids, -1 padded; a group's rows list it, its first row leading) and shared
    [B] (tokens): rows of a group whose first `shared` tokens are the same pages, packed (K and V), which the Triton
    kernel attends once for the group; the result is the same, so here they are not read."""
    page = k_packed.shape[2] * codes_per_word(bits)
    h, d = k_packed.shape[1], k_packed.shape[3]
    vgroup = d // v_scale.shape[-1]
    out = []
    for b, (n, kq, vq) in enumerate(lengths.tolist()):
        slot, used = int(slots[b]), pages[b, : -(-max(kq, vq) // page)]
        m = used.numel()
        keys = dequantize_keys(
            QuantizedKeys(
                k_packed[used].reshape(m * h, k_packed.shape[2], d),
                k_scale[used].reshape(m * h, 1, d),
                k_zero[used].reshape(m * h, 1, d),
            ),
            bits,
            page,
            page,
        )
        keys = keys.view(m, h, page, d).transpose(1, 2).reshape(m * page, h, d)[:kq]
        t = torch.arange(vq, device=q.device)
        vslots = used[t // page] * page + t % page
        values = dequantize_values(
            QuantizedValues(
                *(x[vslots].reshape(1, vq * h, x.shape[-1]) for x in (v_packed, v_scale, v_zero))
            ),
            bits,
            vgroup,
        )
        k = torch.cat([keys, k_tail[slot, : n - kq].float()])
        ring = torch.arange(vq, n, device=q.device) % v_win.shape[1]
        v = torch.cat([values.view(vq, h, d), v_win[slot, ring].float()])
        out.append(grouped_attention(q[b].float(), k.transpose(0, 1), v.transpose(0, 1), sm_scale))
    return torch.stack(out) if out else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
