"""Token scores from a key sketch: a KIVI per-channel 1/2-bit copy of K kept in the GPU tier (`key_sketch`), so
TailorKV's stage 2 ranks prompt tokens without reading K over PCIe. The plain-torch reference;
sketch_scores_triton.py computes the same without materialising the dequantized keys.

Shapes (B rows, H KV heads, head_dim D, C scored channels, T tokens per sketch page, b bits):
- qc [B, H, C] float32: each row's query per KV head on the channels it scores, channels [B, H, C] int64;
- packed [P, H, D, T*b/32] int32, scale and zero [P, H, D, T/64] float16: page p holds one KIVI key block
  (kivi.py's key codes, groups of 64 tokens) per head, channel-major: a channel's words (and its groups' scale and
  zero) are contiguous, so scoring C of D channels reads C/D of the sketch (token-major, each word row of D
  channels is read for its C words: on a GPU, a 32-byte sector per chosen channel and word);
- pages [B, NP] int64: each row's sketch pages in token order, -1 past its last page.
Returns scores [B, H, NP*T] float32: qc . the chosen channels of each token's dequantized key (0 on missing
pages). Scoring C << D channels (TailorKV's d_s) is what keeps this cheap: unpacking costs per token and channel.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from . import block_maxima
from .dispatch import pick
from .kivi import QuantizedKeys, codes_per_word, dequantize_keys

GROUP = 64  # tokens per scale/zero row


def sketch_scores(
    qc: torch.Tensor,
    channels: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    pages: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    (b, n), h = pages.shape, packed.shape[1]
    t, c = packed.shape[3] * codes_per_word(bits), channels.shape[-1]
    pg = pages.clamp(min=0)
    # the chosen channels first, then only those dequantized (C of D: what the Triton kernel unpacks too)
    at = channels[:, None, :, :, None]

    def chosen(x: torch.Tensor) -> torch.Tensor:
        rows = x[pg]  # [B, NP, H, D, words or groups]
        picked = rows.gather(-2, at.expand(*rows.shape[:3], c, rows.shape[-1]))
        return picked.transpose(-1, -2).reshape(-1, rows.shape[-1], c)  # kivi's [blocks, words, C]

    qk = QuantizedKeys(chosen(packed), chosen(scale), chosen(zero))
    keys = dequantize_keys(qk, bits, GROUP, t).view(b, n, h, t, c)
    scores = torch.einsum("bhc,bnhtc->bhnt", qc.float(), keys) * (pages >= 0)[:, None, :, None]
    return scores.reshape(b, h, n * t)


def sketch_scores_and_maxima(
    qc: torch.Tensor,
    channels: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    pages: torch.Tensor,
    bits: int,
    begin: torch.Tensor,
    end: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sketch_scores and block_maxima's maxima of them (blocks of `chunk` positions, positions outside each row's
    [begin, end) [B] left out): what stage 2's top-k by blocks reads."""
    scores = sketch_scores(qc, channels, packed, scale, zero, pages, bits)
    return scores, block_maxima.block_maxima(scores, begin, end, chunk)


def ops(device: torch.device | str) -> ModuleType:
    return pick(device, "sketch_scores_triton", sys.modules[__name__])
