"""Rotary position embedding in the HF rotate-half layout, with the default and `llama3` frequency rules."""

from __future__ import annotations

import math

import torch

from ..errors import ModelLoadError
from .elementwise import rope


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] (float32), after any supported rope scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default"):
        return inv.float()
    if kind != "llama3":
        raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: default, llama3")
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()


CHUNK = 8192  # tokens rotated per call in a long prefill


class Rotary:
    """Precomputed cos/sin tables; `apply` rotates q or k of shape [T, heads, head_dim] at `positions` [T] with
    `rotate` (elementwise.rope, or its compiled form)."""

    def __init__(
        self, head_dim: int, max_position: int, theta: float, scaling: dict | None, device, dtype
    ):
        inv = inv_frequencies(head_dim, theta, scaling)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv)
        emb = torch.cat([angles, angles], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.rotate = rope

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if (
            x.shape[0] > CHUNK
        ):  # a long prefill in chunks: the temporaries of all tokens at once would not fit
            return torch.cat(
                [self.apply(a, p) for a, p in zip(x.split(CHUNK), positions.split(CHUNK))]
            )
        return self.rotate(x, self.cos, self.sin, positions)
