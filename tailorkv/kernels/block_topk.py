"""Stage 2's top-k by blocks, in one launch after the block maxima: token_topk's contract (the k_r largest scores
among positions [begin, end) per row, in position order, ties lowest position first) found through `chunk`-position
blocks. The plain-torch reference; block_topk_triton.py gives each (row, KV head) one program that takes the k_r
blocks with the largest maxima (ties: lowest block first) and then the k_r largest scores of their positions.

Why the blocks give the exact set: a selected score x whose block were not taken would leave k_r taken blocks whose
maxima are at least x's block maximum (the equal ones earlier in the row), hence k_r scores ranking above x.

Shapes as token_topk.top_positions, with chunk >= 1; `fits` says whether the kernel's tiles hold a call's shape.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from . import token_topk
from .dispatch import pick


def fits(length: int, k: int, chunk: int) -> bool:
    """Every shape fits the reference."""
    return True


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
    chunk: int = 32,
    maxima: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_topk.top_positions (the blocks change which scores are read, not the set). `maxima`: block_maxima's
    of the scores over [begin, end), where the caller has them already."""
    return token_topk.top_positions(scores, begin, end, k, k_rows)


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "block_topk_triton", sys.modules[__name__])
