"""Linear layers on CPU through oneDNN (models/cpu_linear.py): the product nn.Linear gives, to float32 rounding, at
awkward widths and batches, with and without a bias; a row's output the same bits in any batch; packing twice
changes nothing and other dtypes stay nn.Linear; the embedded model's layers are packed, once a process."""

import pytest
import torch
from torch import nn

from tailorkv.models.cpu_linear import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (37, 3), (1536, 576)])
def test_packed_linear_is_nn_linear(in_features, out_features, bias):
    gen = torch.Generator().manual_seed(in_features + out_features)
    plain = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        if bias:
            plain.bias.copy_(torch.randn(out_features, generator=gen))
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    model[0].load_state_dict(plain.state_dict())
    packed = {}
    pack_linears(model, packed)
    pack_linears(model, packed)  # again: nothing
    assert list(packed) == ["0"] and model[0].packed is packed["0"]
    assert type(model[0]) is PackedLinear
    x = torch.randn(300, in_features, generator=gen)
    with torch.inference_mode():
        want, got = plain(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * in_features**0.5)
        for rows in (1, 2, 3, 17):  # row 0 beside other rows: the same bits
            assert torch.equal(model(x[:rows])[0], got[0])
        one = x[:1].reshape(1, 1, -1)  # one row, in any shape
        assert torch.equal(model(one), got[:1].reshape(1, 1, -1))


def test_other_dtypes_stay_nn_linear():
    model = nn.Sequential(nn.Linear(8, 4).to(torch.bfloat16), nn.Linear(4, 2))
    pack_linears(model, {})
    assert type(model[0]) is nn.Linear and type(model[1]) is PackedLinear


def test_the_embedded_models_linears_are_packed():
    from tailorkv.models.loader import load_model

    model, _ = load_model(None, torch.device("cpu"), torch.float32, progress=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 30 + 1 and all(type(m) is PackedLinear for m in linears)
    # loaded again: the same weights and packed copies, read once a process; in another dtype: its own
    again, _ = load_model("embedded", torch.device("cpu"), torch.float32, progress=False)
    assert again is not model and again.lm_head.packed is model.lm_head.packed
    w = again.layers[3].mlp.down_proj.weight
    assert w.data_ptr() == model.layers[3].mlp.down_proj.weight.data_ptr()
    bf16, _ = load_model(None, torch.device("cpu"), torch.bfloat16, progress=False)
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and type(bf16.lm_head) is nn.Linear
