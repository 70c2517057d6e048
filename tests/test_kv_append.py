"""The new K and V of a decode step written in one launch: the Triton kernel against the reference's index_puts,
exactly, with rows out of slot order, a head count of 3, head_dim 64, and k, v strided views of one projection."""

import pytest
import torch
from triton_kernels import DEVICE, triton_module

from tailorkv.kernels import kv_append as ref


@pytest.mark.parametrize("b,h,d", [(1, 8, 128), (3, 3, 64), (5, 1, 64)])
def test_triton_writes_what_the_reference_writes(b, h, d):
    kt = triton_module("kv_append_triton")
    g = torch.Generator().manual_seed(b * h)
    gen = [torch.randn(17, h, d, generator=g).to(torch.bfloat16) for _ in range(2)]
    kv = torch.randn(b, 3 * h, d, generator=g).to(torch.bfloat16)
    k, v = kv[:, h : 2 * h], kv[:, 2 * h :]  # strided views, as the fused projection leaves them
    at = torch.randperm(17, generator=g)[:b]
    want = [x.clone() for x in gen]
    ref.append_kv(*want, at, k, v)
    got = [x.to(DEVICE, copy=True) for x in gen]
    kt.append_kv(*got, at.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
    assert all(torch.equal(x.cpu(), y) for x, y in zip(got, want))
    assert not torch.equal(want[0], gen[0])  # the case writes something
