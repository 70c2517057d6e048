"""GGUF dequantization in torch: bit for bit gguf.quants' float32 values, for the block types it implements (Q4_0,
Q4_1, Q8_0), plain floats and a type it hands to gguf (Q5_0), at a shape of several rows of several blocks; and for
the embedded model's own Q4_1 and Q8_0 tensors."""

import gguf
import numpy as np
import pytest
import torch

from tailorkv.models.embedded import embedded_model_path
from tailorkv.models.gguf_dequant import dequantize
from tailorkv.models.gguf_loader import PlainReader

Q = gguf.GGMLQuantizationType


def reference(data: np.ndarray, qtype) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.F16, Q.F32])
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    gen = np.random.default_rng(0)
    x = (gen.standard_normal((5, 96)) * gen.uniform(0.01, 30, (5, 1))).astype(np.float32)
    x[2, :32] = 0  # an all-zero block: scale 0
    x[3, 40] = 1e4  # one block dominated by an outlier
    data = gguf.quants.quantize(x, qtype)
    got = dequantize(data, qtype)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert torch.equal(got, reference(data, qtype))
    assert torch.equal(dequantize(data[1:4], qtype), reference(data, qtype)[1:4])  # a row slice


def test_dequantize_the_embedded_models_tensors():
    reader = PlainReader(embedded_model_path())
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in seen and kind in ("Q4_1", "Q8_0"):
            rows = t.data[:64]  # the first rows: the Q8_0 embedding is 49,152 rows
            assert torch.equal(dequantize(rows, t.tensor_type), reference(rows, t.tensor_type))
            seen.add(kind)
    assert seen == {"Q4_1", "Q8_0"}
