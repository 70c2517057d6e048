"""The fp8 host tier (`--host-kv-dtype fp8`): a token's row of one KV head, [K | V], stored as float8 e4m3 codes
with one bfloat16 scale for K and one for V (max|x| / 448 of that token and KV head): 2D + 4 bytes where a bf16 row
takes 4D. Packed rows are uint8 [..., row_width(D, align)]: K codes, V codes, K scale, V scale (little-endian bf16),
then zeros up to a multiple of `align` bytes (`fp8_row_align`): 4, none at an even head_dim; 16 (2D + 16 bytes at a
head_dim that divides by 8), so that every row starts 16 bytes aligned and the top-k fetch reads it over PCIe in
16-byte loads, for 4.6% more host bytes at head_dim 128.

Decode's top-k fetch reads the packed rows and the sparse attention kernels dequantize them as they load them;
every prompt-time read of host rows (a shared prefix, a prompt's earlier chunks, GPU copies of host pages, which
hold the same packed bytes) dequantizes to the compute dtype here, so prefill after a prefix sees the fp8 values.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
SCALE_BYTES = 4  # two bfloat16 scales per row
ALIGNS = (4, 16)  # the row alignments a host tier may use (fp8_row_align)


def row_width(head_dim: int, align: int = 4) -> int:
    """Bytes of one packed row, padded to a multiple of `align`."""
    return -(-(2 * head_dim + SCALE_BYTES) // align) * align


def quantize_rows(kv: torch.Tensor, align: int = 4) -> torch.Tensor:
    """Rows kv [..., 2D] (K then V, any float dtype) -> packed uint8 [..., row_width(D, align)]."""
    d = kv.shape[-1] // 2
    x = kv.float().unflatten(-1, (2, d))
    tiny = torch.finfo(torch.bfloat16).tiny
    scale = (x.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=tiny).to(torch.bfloat16)
    # the stored (rounded) scale divides, so codes times it is the dequantized value; clamp: the rounding may
    # push max|x| a little past 448, which e4m3fn has no code for
    codes = (x / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    scale_bytes = scale.flatten(-2).contiguous().view(torch.uint8)
    pad = kv.new_zeros(*kv.shape[:-1], row_width(d, align) - 2 * d - SCALE_BYTES, dtype=torch.uint8)
    return torch.cat([codes.flatten(-2).view(torch.uint8), scale_bytes, pad], -1)


def dequantize_rows(packed: torch.Tensor, dtype: torch.dtype, head_dim: int) -> torch.Tensor:
    """Packed rows uint8 [..., row_width(head_dim, any align)] -> [..., 2D] in `dtype` (codes times their scale, in
    float32)."""
    d = head_dim
    codes = packed[..., : 2 * d].contiguous().view(torch.float8_e4m3fn).float()
    scale = packed[..., 2 * d : 2 * d + SCALE_BYTES].contiguous().view(torch.bfloat16).float()
    return (codes.unflatten(-1, (2, d)) * scale[..., None]).flatten(-2).to(dtype)
