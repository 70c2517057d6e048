"""GGUF block dequantization in torch for the legacy block types (Q4_0, Q4_1, Q8_0) and plain floats: the same
float32 values as gguf.quants.dequantize (the same operations in the same order), ~9x faster on one core (the
embedded model: 3.1 s to 0.33 s), and on every core torch is given. Other types go through gguf.quants."""

from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType


def _blocks(data: np.ndarray, size: int) -> torch.Tensor:
    """The packed bytes [..., n * size] as [blocks, size] (a copy: the file's mapping is read-only)."""
    return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).view(-1, size)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[blocks, 16] bytes -> [blocks, 32] values: the low nibbles are elements 0-15, the high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def dequantize(data: np.ndarray, qtype) -> torch.Tensor:
    """float32 [..., elements] from a GGUF tensor's data (packed bytes [..., bytes] for block types)."""
    if qtype == Q.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
    if qtype == Q.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16, copy=True)).float()
    if qtype not in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (*data.shape[:-1], data.shape[-1] // size * block)
    b = _blocks(data, size)
    if qtype == Q.Q8_0:  # d, 32 int8
        w = b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))
    elif qtype == Q.Q4_0:  # d, 32 nibbles - 8
        w = (_nibbles(b[:, 2:]).view(torch.int8) - 8).float().mul_(_f16(b, 0))
    else:  # Q4_1: d, m, 32 nibbles; d * q + m, rounded after each
        w = _nibbles(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))
    return w.view(shape)
