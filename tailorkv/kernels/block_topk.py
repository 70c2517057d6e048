"""Stage 2's top-k as positions, by blocks: token_topk.top_positions's result (the same set, in position order, the
same valid slots) found in two short selections instead of one over the whole row. The plain-torch reference is
token_topk's own: the set does not depend on `chunk`. block_topk_triton.py takes each `chunk`-position block's
maximum (block_maxima_triton.py), selects the k' blocks with the largest maxima, then the k_r largest scores
among those blocks' positions, each selection one program a row.

Why the blocks hold the exact set: let T be a row's k_r-th largest score. Fewer than k_r scores exceed T, so fewer
than k' blocks have a maximum above T, and all of them are selected. Blocks whose maximum equals T are taken
lowest first; if one holding a needed tie (ties go lowest position first) were left out, k' - (blocks above T)
selected blocks before it would each hold a tie at a lower position, at least as many as the ties needed.

Shapes as token_topk.top_positions, and chunk >= 1.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from . import token_topk
from .dispatch import pick


def top_positions(
    scores: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    k: int,
    k_rows: torch.Tensor | None = None,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    return token_topk.top_positions(scores, begin, end, k, k_rows)


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "block_topk_triton", sys.modules[__name__])
