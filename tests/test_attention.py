"""causal_attention (every prefill's attention) against a brute-force softmax over an explicit causal mask."""
import pytest
import torch

from tailorkv.kernels.attention import causal_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force(q, k, v, q_start):
    g = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(g, dim=1) for x in (k, v))
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * q.shape[-1] ** -0.5
    seen = torch.arange(k.shape[0]) <= torch.arange(q_start, q_start + q.shape[0])[:, None]
    return torch.einsum("hnl,lhd->nhd", scores.masked_fill(~seen.to(q.device), float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,q_start", [(37, 0), (37, 100), (1, 130), (64, 1)])
def test_causal_attention_from_any_position(device, n, q_start):
    """GQA group 3, head_dim 64; a chunk after q_start earlier tokens sees them all and its own past only."""
    torch.manual_seed(n + q_start)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(n, 6, 64, device=device, dtype=dtype)
    k, v = (torch.randn(q_start + n, 2, 64, device=device, dtype=dtype) for _ in range(2))
    got = causal_attention(q, k, v, q_start)
    assert got.shape == q.shape and got.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), brute_force(q, k, v, q_start), **tol)


def test_causal_attention_rejects_keys_that_do_not_end_at_the_chunk():
    q, k = torch.randn(4, 2, 64), torch.randn(9, 2, 64)
    with pytest.raises(ValueError, match="need 8 keys, got 9"):
        causal_attention(q, k, k, 4)
