"""Stage 1 from the real query in one launch: the Triton kernel held to the torch reference (channel ids exactly,
their query means to float32 rounding), the reference to Eq. 10 as selection.py ranks it, ties to the lower
channel. Awkward shapes: GQA groups of 3, head_dim 64, d_s 1 and 12, rows reading max_abs out of order, q a strided
view in bf16."""

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import channel_select as ref
from tailorkv.kvcache.selection import query_channels, select_channels


@pytest.fixture(scope="module")
def kt():
    return triton_module("channel_select_triton")


def _case(b, hq, h, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, hq + 2 * h, d, generator=g).to(dtype)
    max_abs = torch.rand(b + 3, h, d, generator=g)
    slots = torch.randperm(b + 3, generator=g)[:b]
    return qkv[:, :hq], max_abs, slots  # q: a strided view, as the step's projection leaves it


CASES = [(1, 9, 3, 64, 8), (3, 32, 8, 128, 12), (2, 4, 4, 64, 1), (5, 12, 4, 128, 8)]


@pytest.mark.parametrize("b,hq,h,d,d_s", CASES)
def test_reference_is_eq10_ranked_largest_first(b, hq, h, d, d_s):
    q, max_abs, slots = _case(b, hq, h, d, seed=hq)
    channels, qc = ref.select_channels(q, max_abs, slots, d_s)
    want = select_channels(q, max_abs[slots], d_s)
    assert torch.equal(channels.sort(-1).values, want.sort(-1).values)
    assert torch.allclose(qc, query_channels(q, channels), rtol=1e-6, atol=1e-7)
    score = (qc.abs() * max_abs[slots].gather(-1, channels)).flatten(0, 1)
    assert (score[:, :-1] >= score[:, 1:]).all()  # largest first


def test_ties_take_the_lower_channel():
    q = torch.ones(1, 2, 8)
    max_abs = torch.tensor([[[0, 1, 0, 1, 1, 0, 0, 0.5]]])
    channels, qc = ref.select_channels(q, max_abs, torch.tensor([0]), 4)
    assert channels.tolist() == [[[1, 3, 4, 7]]] and torch.equal(qc, torch.ones(1, 1, 4))


@pytest.mark.parametrize("b,hq,h,d,d_s", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(kt, b, hq, h, d, d_s, dtype):
    q, max_abs, slots = _case(b, hq, h, d, seed=d + d_s, dtype=dtype)
    max_abs[slots[0], 0, : d // 2] = 0.0  # ties: half a head's channels score 0
    want = ref.select_channels(q, max_abs, slots, d_s)
    got = kt.select_channels(q.to(DEVICE), max_abs.to(DEVICE), slots.to(DEVICE), d_s)
    assert torch.equal(got[0].cpu(), want[0])
    assert torch.allclose(got[1].cpu(), want[1], rtol=1e-6, atol=1e-7)
