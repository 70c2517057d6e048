"""Rows of a prompt whose first tokens sit in a shared prefix (read back from the host tier) and the rest in
this step's new tokens."""
from __future__ import annotations

import torch


def prompt_span(begin: int, end: int, start: int, before: torch.Tensor | None,
                after: torch.Tensor) -> list[torch.Tensor]:
    """Rows of prompt positions [begin, end): those under `start` from `before` (the shared prefix, positions from
    0), the rest from `after` (the tokens from `start` on); torch.cat them."""
    parts = [before[begin:min(end, start)]] if begin < min(end, start) else []
    return parts + ([after[max(begin, start) - start:end - start]] if end > max(begin, start) else [])
