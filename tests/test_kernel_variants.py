"""On CUDA, each kernel is compiled once for every length. Triton would otherwise compile another variant when a
length first is 1 or a multiple of 16 (its integer specialization), or when a constexpr block follows a length:
in the middle of serving, a 1.5-1.9 s step (seen as a later turn's time to first token in the document chat).
The lengths that vary between steps are not specialized, and the merge of splits walks them in fixed blocks."""

import pytest
import torch
from test_kivi import PAGED_ROWS, _paged_case
from test_sketch_scores import _case as sketch_case
from test_sparse_attention import _case as sparse_case
from triton_kernels import CUDA, triton_module

pytestmark = pytest.mark.skipif(not CUDA, reason="compiled variants exist on CUDA only")


def variants(kernel) -> int:
    return len(kernel.device_caches[torch.cuda.current_device()][0])


def test_one_variant_for_every_length():
    kivi = triton_module("kivi_triton")
    sketch = triton_module("sketch_scores_triton")
    sparse = triton_module("sparse_attention_triton")
    kernels = (
        kivi._quantize_keys_kernel,
        kivi._quantize_values_kernel,
        sketch._sketch_scores_kernel,
        sparse._sparse_decode_kernel,
        sparse._merge_sparse_splits_kernel,
        kivi._paged_decode_kernel,
        kivi._merge_splits_kernel,
    )
    before = [
        variants(k) for k in kernels
    ]  # the engine's group sizes and dtypes of earlier tests are others
    for t in (197, 64, 1, 130):  # tokens: neither, a multiple of 16, 1
        x = torch.randn(3, t, 64, device="cuda", dtype=torch.bfloat16)
        kivi.quantize_keys(x, 2)
        kivi.quantize_values(x, 2)
    for num_pages in (9, 16, 17):  # page-table widths 3 (and 1 for padded rows), 5, 5
        _, qc, channels, packed, scale, zero, pages = sketch_case(3, 3, 64, 256, num_pages, 2, 12)
        sketch.sketch_scores(qc, channels, packed, scale, zero, pages, 2)
    for g in (5, 16, 1, 33):  # generated tokens per row
        sparse.sparse_decode_attention(*sparse_case(3, 9, 3, 64, 37, g, 45, torch.bfloat16))
    for rows in (
        PAGED_ROWS,
        [(2500, 2432, 2372), (70, 64, 6)],
        [(64, 64, 0)],
    ):  # 5, 40 and 1 splits
        kivi.paged_decode_attention(*_paged_case(2, rows, dtype=torch.bfloat16))
    for kernel, n in zip(kernels, before):
        assert variants(kernel) - n <= 1, kernel.fn.__name__
