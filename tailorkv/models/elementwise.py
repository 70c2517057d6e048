"""The elementwise work around a layer's GEMMs: RMSNorm (with the residual add before it), SwiGLU's gate and RoPE,
as plain torch functions of tensors.

Eager torch launches 4 to 10 small kernels for each of them, a few microseconds apiece even inside a CUDA graph.
`--enable-torch-compile` runs each function through torch.compile (Inductor), which fuses it into one kernel. The
compiled part stops at the GEMMs, the tensor-parallel reduces and the KV policy's attention, which stay as they are
(SGLang compiles the whole layer with the attention as an opaque custom op). The weights are arguments, not the
layers' modules, so one compiled graph serves every layer: Dynamo would guard on, and recompile for, each module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream h + delta, and its RMSNorm."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's SiLU(gate) * up of the fused gate/up projection's output [T, 2 * intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """x [T, heads, head_dim] rotated at positions [T] (rotate-half layout; cos, sin: [max_position, head_dim])."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s


class Elementwise:
    """The functions a model's forward calls: eager, or each compiled by torch.compile."""

    def __init__(self, compiled: bool = False):
        self.compiled = compiled
        wrap = torch.compile if compiled else (lambda f: f)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.silu_mul = wrap(silu_mul)
        self.rope = wrap(rope)
