"""The block maxima of the two-stage top-k (kvcache/selection.py): the maximum of each `chunk`-position block of a
row's scores, positions outside [begin, end) and past the row counted as -inf. The plain-torch reference;
block_maxima_triton.py computes the same in one pass over the scores with a grid fixed by the shape alone.

Shapes: scores [..., H, L] float32 (H KV heads); begin, end: 0-d or [...] (one range per sequence); chunk >= 1.
Returns [..., H, ceil(L / chunk)] float32 (the last block may be short; a block with no position inside the range
is -inf).
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from .dispatch import pick


def block_maxima(
    scores: torch.Tensor, begin: torch.Tensor, end: torch.Tensor, chunk: int
) -> torch.Tensor:
    n = scores.shape[-1]
    blocks = -(-n // chunk)
    pos = torch.arange(n, device=scores.device)
    if begin.dim():
        begin, end = begin[..., None, None], end[..., None, None]
    masked = scores.masked_fill((pos < begin) | (pos >= end), float("-inf"))
    padded = torch.nn.functional.pad(masked, (0, blocks * chunk - n), value=float("-inf"))
    return padded.view(*scores.shape[:-1], blocks, chunk).amax(-1)


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "block_maxima_triton", sys.modules[__name__])
