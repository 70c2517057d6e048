"""KIVI quantization: properties of the torch reference, and the Triton kernels held equal to it.

Without CUDA the Triton kernels run in the interpreter on CPU; with CUDA they are compiled and fed half-precision
inputs, compared against the float32 reference at relative error 1e-2.
"""

import pytest
import torch
from triton_kernels import CUDA, DEVICE, triton_module  # noqa: F401

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
    return (
        x * (0.5 + torch.rand(shape[-1], generator=_gen(seed + 1), device=DEVICE))
        + 2 * x[..., :1, :]
    ).to(dtype)


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
    assert (
        qk.scale.shape == qk.zero.shape == (n, -(-t // 64), d) and qk.scale.dtype == torch.float16
    )
    bound = _bound(qk.scale, qk.zero, bits).repeat_interleave(64, 1)[:, :t]
    assert ((K.dequantize_keys(qk, bits, 64, t) - k).abs() <= bound).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_value_round_trip_within_half_step(bits, shape):
    n, t, d = shape
    v = _randn(n, t, d)
    qv = K.quantize_values(v, bits)
    assert qv.packed.shape == (n, t, d * bits // 32) and qv.scale.shape == qv.zero.shape == (
        n,
        t,
        d // 64,
    )
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
    assert qk.packed.view(-1).tolist() == [
        0xE4E4E4E4 - 2**32,
        0b10,
    ]  # 0b11_10_01_00: token 0 in bits 0-1
    # values, 4 bits: 8 channels per word; channel c holds c % 16 with min 0, max 15 -> code c % 16
    v = (torch.arange(32) % 16).float().view(1, 1, 32)
    qv = K.quantize_values(v, 4)
    assert qv.packed.view(-1).tolist() == [
        0x76543210,
        0xFEDCBA98 - 2**32,
        0x76543210,
        0xFEDCBA98 - 2**32,
    ]


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
    pairs = [
        (
            K.dequantize_keys(K.quantize_keys(x, bits), bits, 64, t),
            kt.dequantize_keys(K.quantize_keys(x, bits), bits, 64, t, dtype=dtype),
        ),
        (
            K.dequantize_values(K.quantize_values(x, bits), bits, 64),
            kt.dequantize_values(K.quantize_values(x, bits), bits, 64, dtype=dtype),
        ),
    ]
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
        outs.append(
            torch.softmax(scores, 0) @ v[h // group].double()
            if len(scores)
            else torch.zeros_like(q[h])
        )
        lses.append(torch.logsumexp(scores, 0))
    return torch.stack(outs).float(), torch.stack(lses).float()


PAGED_ROWS = [
    (1, 0, 0),
    (197, 128, 69),
    (300, 256, 172),
    (64, 64, 0),
    (130, 128, 2),
]  # (n, kq, vq) per sequence


def _paged_case(bits, rows=PAGED_ROWS, dtype=torch.float32, hq=9, hkv=3, d=64, r=128):
    """A page pool of random K/V quantized per page, a page table of distinct pages per sequence, tails in shuffled
    window slots; the arguments of paged_decode_attention."""
    width = max(-(-n // 64) for n, _, _ in rows)
    num_pages, num_slots = max(24, width), 7
    keys = _randn(num_pages * hkv, 64, d, seed=2)
    qk = K.quantize_keys(keys, bits)
    qv = K.quantize_values(_randn(1, num_pages * 64 * hkv, d, seed=3), bits)
    k_packed = qk.packed.view(num_pages, hkv, -1, d)
    k_scale, k_zero = (x.view(num_pages, hkv, d) for x in (qk.scale, qk.zero))
    v_packed, v_scale, v_zero = (x.view(num_pages * 64, hkv, -1) for x in qv)
    k_tail = _randn(num_slots, r, hkv, d, seed=4, dtype=dtype)
    v_win = _randn(num_slots, r + 1, hkv, d, seed=5, dtype=dtype)
    gen = torch.Generator().manual_seed(bits)
    pages = torch.stack([torch.randperm(num_pages, generator=gen)[:width] for _ in rows]).to(DEVICE)
    slots = torch.randperm(num_slots, generator=gen)[: len(rows)].to(DEVICE)
    q = _randn(len(rows), hq, d, seed=1, dtype=dtype)
    return (
        q,
        k_packed,
        k_scale,
        k_zero,
        v_packed,
        v_scale,
        v_zero,
        k_tail,
        v_win,
        pages,
        slots,
        torch.tensor(rows, device=DEVICE),
        bits,
        d**-0.5,
    )


@pytest.mark.parametrize("bits", [1, 2])
def test_reference_paged_decode_attention_is_exact(bits):
    """Each sequence against brute force over its tokens gathered by hand: K from its pages below kq, then the K
    tail; V from its token slots below vq, then the V window (a ring)."""
    case = _paged_case(bits)
    q, kp, ks, kz, vp, vs, vz, k_tail, v_win, pages, slots, lengths, _, sm_scale = case
    out = K.paged_decode_attention(*case)
    for b, (n, kq, vq) in enumerate(lengths.tolist()):
        keys, values = [], []
        for t in range(n):
            page, off = int(pages[b, t // 64]), t % 64
            if t < kq:
                qk = K.QuantizedKeys(kp[page], ks[page][:, None], kz[page][:, None])
                keys.append(K.dequantize_keys(qk, bits, 64, 64)[:, off])
            else:
                keys.append(k_tail[slots[b], t - kq].float())
            if t < vq:
                slot = page * 64 + off
                values.append(
                    K.dequantize_values(
                        K.QuantizedValues(vp[slot][None], vs[slot][None], vz[slot][None]), bits, 64
                    )[0]
                )
            else:
                values.append(v_win[slots[b], t % v_win.shape[1]].float())
        want, _ = _attention(q[b], torch.stack(keys, 1), torch.stack(values, 1), sm_scale)
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)


PAGED_SHAPES = [(1, (9, 3, 64)), (2, (9, 3, 64)), (4, (9, 3, 64)), (2, (8, 2, 128))]


@pytest.mark.parametrize(
    "bits,heads,dtype",
    [(*c, t) for c in PAGED_SHAPES for t in (torch.bfloat16, torch.float16)]
    if CUDA  # on CPU float32 at every shape, bf16 at two (the interpreter is slow)
    else [(*c, torch.float32) for c in PAGED_SHAPES]
    + [(*PAGED_SHAPES[0], torch.bfloat16), (*PAGED_SHAPES[3], torch.bfloat16)],
)
def test_triton_paged_decode_attention_matches_reference(kt, bits, heads, dtype):
    """GQA 3 at head_dim 64, and Llama-3.1-8B's GQA 4 at head_dim 128; 16-bit queries take the kernel's float16
    tiles (codes to float16 by their bits), in the interpreter too."""
    hq, hkv, d = heads
    case = _paged_case(bits, dtype=dtype, hq=hq, hkv=hkv, d=d)
    got = kt.paged_decode_attention(*case)
    want = K.paged_decode_attention(
        *(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in case)
    )
    assert got.dtype == torch.float32 and got.shape == want.shape
    if CUDA or dtype != torch.float32:
        assert _rel_err(got, want) <= (1e-2 if CUDA else 2e-3)
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("programs", [None, 1])
def test_triton_half_page_tiles_match_the_reference(kt, monkeypatch, programs):
    """Tiles of 32 tokens (two an iteration's page): 1-bit keys one word row a tile, 16-bit queries. In one split a
    row's packed tiles cross pages (two tiles a page id) and end inside the split; the last row's values are packed
    past its packed keys (vq > kq), so the keys' tail meets values from their pages."""
    if programs:
        monkeypatch.setattr(kt, "_TARGET_PROGRAMS", programs)
        monkeypatch.setattr(kt, "_MIN_SPLITS", 0)
    case = _paged_case(1, PAGED_ROWS + [(300, 256, 290)], dtype=torch.bfloat16, hq=8, hkv=2, d=128)
    want = K.paged_decode_attention(
        *(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in case)
    )
    assert _rel_err(kt.paged_decode_attention(*case, tile=32), want) <= (1e-2 if CUDA else 2e-3)


@pytest.mark.parametrize("programs", [1, 4096])
@pytest.mark.parametrize("rows", [PAGED_ROWS, [(2500, 2432, 2372), (70, 64, 6)]])
def test_triton_paged_decode_attention_one_split_or_many(kt, monkeypatch, programs, rows):
    """One split walks every page of a sequence, carrying the online softmax; many splits leave most of a short
    sequence's splits empty, which the merge must weigh as nothing (40 splits: the merge's blocks of 16, the
    short row's last two blocks empty)."""
    monkeypatch.setattr(kt, "_TARGET_PROGRAMS", programs)
    monkeypatch.setattr(kt, "_MIN_SPLITS", 0)
    case = _paged_case(2, rows)
    torch.testing.assert_close(
        kt.paged_decode_attention(*case), K.paged_decode_attention(*case), atol=1e-4, rtol=1e-4
    )


def test_context_splits_give_each_pair_at_least_min_splits(kt):
    """128k tokens (2,048 pages): batch 1's 8 (row, KV head) pairs take the 256 programs' 32 splits; batch 12's 96
    take 8 splits each, where 256 programs left 2 (192 programs, fewer than an H100's SMs); an explicit target is
    kept as given."""
    assert kt.context_splits(2048, 8) == (64, 32)
    assert kt.context_splits(2048, 96) == (256, 8)
    assert kt.context_splits(2048, 96, 256) == (1024, 2)
    assert kt.context_splits(3, 96) == (1, 3)  # never more splits than pages


SHARED_ROWS = [
    (300, 256, 250),
    (260, 256, 200),
    (197, 128, 69),
    (400, 384, 300),
]  # rows 0, 1, 3 share 3 pages


@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)])
def test_triton_attends_a_shared_prefix_once_for_its_group(kt, monkeypatch, heads):
    """Rows 0, 1 and 3 share their first three pages (192 tokens, packed K and V in each), led by row 0; row 2
    shares nothing. With splits of one page the leader's programs attend the shared splits for all three (GQA 3:
    five rows a 16-row tile; GQA 4: four): the members' own page tables for those pages are not read, so pointing
    them elsewhere changes nothing, and the result is the reference's over the shared pages (the members' programs
    run after the leader's in the interpreter: one that wrote its shared splits anyway would show)."""
    monkeypatch.setattr(kt, "_TARGET_PROGRAMS", 4096)
    hq, hkv, d = heads
    case = list(_paged_case(2, SHARED_ROWS, hq=hq, hkv=hkv, d=d))
    pages = case[9]
    pages[[1, 3], :3] = pages[0, :3]
    want = K.paged_decode_attention(*case)
    g = 16 // (hq // hkv)
    members = torch.full((4, g), -1, dtype=torch.long, device=DEVICE)
    members[0, :3] = torch.tensor([0, 1, 3])
    members[[1, 3], 0] = 0
    members[2, 0] = 2
    shared = torch.tensor([192, 192, 0, 192], device=DEVICE)
    case[9] = pages.clone()  # the members' tables no longer matter inside the prefix
    case[9][[1, 3], :3] = pages[2, :3]
    got = kt.paged_decode_attention(*case, members=members, shared=shared)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    alone = kt.paged_decode_attention(
        *case
    )  # without the group rows 1 and 3 read what their tables now name
    assert _rel_err(alone[1], want[1]) > 1e-2 and _rel_err(alone[3], want[3]) > 1e-2


def test_ops_dispatch():
    assert K.ops("cpu") is K
    if CUDA:
        assert K.ops("cuda").__name__ == "tailorkv.kernels.kivi_triton"
