"""KIVI quantization: properties of the torch reference, and the Triton kernels held equal to it.

Without CUDA the Triton kernels run in the interpreter on CPU; with CUDA they are compiled and fed half-precision
inputs, compared against the float32 reference at relative error 1e-2.
"""
import pytest
import torch

from triton_kernels import CUDA, DEVICE, triton_module  # noqa: F401  (first: sets the interpreter flag)

from tailorkv.kernels import kivi as K  # noqa: E402

INPUT_DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]
BITS = [1, 2, 4]
SHAPES = [(1, 1, 64), (4, 63, 128), (2, 65, 64), (3, 130, 128), (8, 197, 64)]  # (N, T, D)


@pytest.fixture(scope="module")
def kt():
    return triton_module("kivi_triton")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    # a per-channel offset and spread, like real keys
    x = torch.randn(*shape, generator=_gen(seed), device=DEVICE)
    return (x * (0.5 + torch.rand(shape[-1], generator=_gen(seed + 1), device=DEVICE)) + 2 * x[..., :1, :]).to(dtype)


def _bound(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Half a step, plus the fp16 rounding of zero and of the scale across the 2^b - 1 steps (and fp32 noise)."""
    s, z = scale.float(), zero.float()
    return s / 2 + 2.0**-10 * ((2**bits - 1) * s + z.abs()) + 1e-6


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_key_round_trip_within_half_step(bits, shape):
    n, t, d = shape
    k = _randn(n, t, d)
    qk = K.quantize_keys(k, bits)
    assert qk.packed.shape == (n, -(-t // (32 // bits)), d) and qk.packed.dtype == torch.int32
    assert qk.scale.shape == qk.zero.shape == (n, -(-t // 64), d) and qk.scale.dtype == torch.float16
    bound = _bound(qk.scale, qk.zero, bits).repeat_interleave(64, 1)[:, :t]
    assert ((K.dequantize_keys(qk, bits, 64, t) - k).abs() <= bound).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_value_round_trip_within_half_step(bits, shape):
    n, t, d = shape
    v = _randn(n, t, d)
    qv = K.quantize_values(v, bits)
    assert qv.packed.shape == (n, t, d * bits // 32) and qv.scale.shape == qv.zero.shape == (n, t, d // 64)
    bound = _bound(qv.scale, qv.zero, bits).repeat_interleave(64, -1)
    assert ((K.dequantize_values(qv, bits, 64) - v).abs() <= bound).all()


def _assert_min_or_max(xq: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    tol = 2.0**-10 * (lo.abs() + hi - lo) + 1e-6  # fp16 rounding of zero and scale
    assert (((xq - lo).abs() <= tol) | ((xq - hi).abs() <= tol)).all()


def test_one_bit_dequantizes_to_group_min_or_max():
    k = _randn(3, 130, 64)
    kg = torch.nn.functional.pad(k, (0, 0, 0, 62), value=float("nan")).view(3, 3, 64, 64)
    lo = kg.nan_to_num(float("inf")).amin(2).repeat_interleave(64, 1)[:, :130]
    hi = kg.nan_to_num(float("-inf")).amax(2).repeat_interleave(64, 1)[:, :130]
    _assert_min_or_max(K.dequantize_keys(K.quantize_keys(k, 1), 1, 64, 130), lo, hi)
    v = _randn(3, 5, 128).view(3, 5, 2, 64)
    vq = K.dequantize_values(K.quantize_values(v.flatten(-2), 1), 1, 64).view(3, 5, 2, 64)
    _assert_min_or_max(vq, v.amin(-1, keepdim=True), v.amax(-1, keepdim=True))


@pytest.mark.parametrize("bits", BITS)
def test_constant_group_is_exact(bits):
    k = torch.full((2, 70, 64), 1.5, device=DEVICE)
    k[1] = -0.25
    qk = K.quantize_keys(k, bits)
    assert (qk.scale == 0).all() and (qk.packed == 0).all()
    assert torch.equal(K.dequantize_keys(qk, bits, 64, 70), k)
    assert torch.equal(K.dequantize_values(K.quantize_values(k, bits), bits, 64), k)


def test_packing_is_lsb_first():
    # keys, 2 bits: 16 tokens per word; one channel holds 0,1,2,3,0,1,2,3,... then 2, so min 0, max 3, code = value
    k = torch.tensor([t % 4 for t in range(16)] + [2], dtype=torch.float32).view(1, 17, 1)
    qk = K.quantize_keys(k, 2, group=32)
    assert qk.packed.view(-1).tolist() == [0xE4E4E4E4 - 2**32, 0b10]  # 0b11_10_01_00: token 0 in bits 0-1
    # values, 4 bits: 8 channels per word; channel c holds c % 16 with min 0, max 15 -> code c % 16
    v = (torch.arange(32) % 16).float().view(1, 1, 32)
    qv = K.quantize_values(v, 4)
    assert qv.packed.view(-1).tolist() == [0x76543210, 0xFEDCBA98 - 2**32, 0x76543210, 0xFEDCBA98 - 2**32]


TRITON_SHAPES = [(3, 197, 64), (4, 65, 128), (2, 1, 64), (3, 0, 64)]  # (N, T, D)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_quantize_matches_reference(kt, bits, shape, dtype):
    x = _randn(*shape, dtype=dtype)
    for name in ("quantize_keys", "quantize_values"):
        want, got = getattr(K, name)(x.float(), bits), getattr(kt, name)(x, bits)
        for field, a, b in zip(want._fields, got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (name, field)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_dequantize_matches_reference(kt, bits, shape, dtype):
    x = _randn(*shape)
    t = shape[1]
    pairs = [(K.dequantize_keys(K.quantize_keys(x, bits), bits, 64, t),
              kt.dequantize_keys(K.quantize_keys(x, bits), bits, 64, t, dtype=dtype)),
             (K.dequantize_values(K.quantize_values(x, bits), bits, 64),
              kt.dequantize_values(K.quantize_values(x, bits), bits, 64, dtype=dtype))]
    for want, got in pairs:
        assert got.shape == want.shape and got.dtype == dtype
        if CUDA and want.numel():
            assert _rel_err(got, want) <= 1e-2
        elif not CUDA:
            assert torch.equal(got, want)


def _attention(q, k, v, sm_scale):
    """Brute force, float64, one query head at a time: (out [Hq, D], lse [Hq])."""
    group = q.shape[0] // k.shape[0]
    outs, lses = [], []
    for h in range(q.shape[0]):
        scores = (k[h // group].double() @ q[h].double()) * sm_scale
        outs.append(torch.softmax(scores, 0) @ v[h // group].double() if len(scores) else torch.zeros_like(q[h]))
        lses.append(torch.logsumexp(scores, 0))
    return torch.stack(outs).float(), torch.stack(lses).float()


def _decode_case(t, stored, r, bits, dtype=torch.float32, hq=9, hkv=3, d=64):
    """q, quantized K/V holding `stored` >= t tokens, and a residual sliced out of a 128-token buffer."""
    q = _randn(hq, d, seed=1, dtype=dtype)
    qk = K.quantize_keys(_randn(hkv, stored, d, seed=2), bits)
    qv = K.quantize_values(_randn(hkv, stored, d, seed=3), bits)
    k_res = _randn(hkv, 128, d, seed=4, dtype=dtype)[:, :r]
    v_res = _randn(hkv, 128, d, seed=5, dtype=dtype)[:, :r]
    return q, qk, qv, t, bits, 64, k_res, v_res, d**-0.5


DECODE_CASES = [(197, 197, 37), (0, 0, 5), (130, 130, 0), (0, 0, 0), (128, 192, 100), (300, 300, 3)]


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("t,stored,r", DECODE_CASES)
def test_reference_decode_attention_is_exact(bits, t, stored, r):
    q, qk, qv, t, bits, group, k_res, v_res, sm_scale = case = _decode_case(t, stored, r, bits)
    k = torch.cat([K.dequantize_keys(qk, bits, group, t), k_res], 1)
    v = torch.cat([K.dequantize_values(qv, bits, group)[:, :t], v_res], 1)
    out, lse = K.quantized_decode_attention(*case)
    want_out, want_lse = _attention(q, k, v, sm_scale)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("t,stored,r", DECODE_CASES)
def test_triton_decode_attention_matches_reference(kt, bits, t, stored, r, dtype):
    case = _decode_case(t, stored, r, bits, dtype)
    out, lse = kt.quantized_decode_attention(*case)
    want_out, want_lse = K.quantized_decode_attention(*(x.float() if torch.is_tensor(x) else x for x in case))
    assert out.dtype == lse.dtype == torch.float32 and out.shape == want_out.shape and lse.shape == want_lse.shape
    if t + r == 0:
        assert (out == 0).all() and (lse == float("-inf")).all()
    elif CUDA:
        assert _rel_err(out, want_out) <= 1e-2 and _rel_err(lse, want_lse) <= 1e-2
    else:
        torch.testing.assert_close(out, want_out, atol=1e-4, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=0)


def test_triton_decode_attention_one_split_many_tiles(kt, monkeypatch):
    # one program per KV head walks every quantized tile, carrying the online softmax across them
    monkeypatch.setattr(kt, "_TARGET_PROGRAMS", 1)
    case = _decode_case(197, 197, 37, 2)
    torch.testing.assert_close(kt.quantized_decode_attention(*case), K.quantized_decode_attention(*case),
                               atol=1e-4, rtol=1e-4)


def test_ops_dispatch():
    assert K.ops("cpu") is K
    if CUDA:
        assert K.ops("cuda").__name__ == "tailorkv.kernels.kivi_triton"


def test_merge_attention_states():
    q, k, v = _randn(9, 64, seed=1), _randn(3, 150, 64, seed=2), _randn(3, 150, 64, seed=3)
    whole = _attention(q, k, v, 0.125)
    a, b = _attention(q, k[:, :40], v[:, :40], 0.125), _attention(q, k[:, 40:], v[:, 40:], 0.125)
    for got in (K.merge_attention_states(*a, *b), K.merge_attention_states(*b, *a)):
        torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    torch.testing.assert_close(K.merge_attention_states(*a, *empty), a, atol=1e-6, rtol=1e-6)
    out, lse = K.merge_attention_states(*empty, *empty)
    assert (out == 0).all() and (lse == float("-inf")).all()
