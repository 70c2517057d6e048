"""StagedInputs: many small per-step tensors written on the host and sent to the device in one copy."""

import torch

from tailorkv.kvcache.staging import StagedInputs


def test_fields_reach_the_device_only_when_sent():
    staged = StagedInputs(
        {
            "pages": ((3, 5), torch.long),
            "mask": ((3, 7), torch.bool),
            "len": ((3,), torch.long),
            "empty": ((0,), torch.long),
        },
        "cpu",
    )
    dev = staged.device
    assert [(t.shape, t.dtype) for t in dev.values()] == [
        ((3, 5), torch.long),
        ((3, 7), torch.bool),
        ((3,), torch.long),
        ((0,), torch.long),
    ]
    host = staged.host()
    pages, mask, length = (
        torch.arange(15).view(3, 5) - 4,
        torch.rand(3, 7) > 0.5,
        torch.tensor([2**40, -1, 9]),
    )
    host["pages"].copy_(pages)
    host["mask"].copy_(mask)
    host["len"].copy_(length)
    assert not dev["pages"].any() and not dev["mask"].any()  # written on the host, not sent yet
    staged.send()
    assert (
        torch.equal(dev["pages"], pages)
        and torch.equal(dev["mask"], mask)
        and torch.equal(dev["len"], length)
    )
    host["pages"].fill_(7)  # the next step's values leave what was sent alone until sent
    assert torch.equal(dev["pages"], pages)


def test_every_field_is_16_byte_aligned():
    """Triton compiles a variant of a kernel for pointers that are not 16-byte aligned: fields of odd sizes must
    not shift the ones after them off that alignment (on the GPU a new variant is a second-long step)."""
    staged = StagedInputs(
        {
            "a": ((3,), torch.bool),
            "b": ((5,), torch.int32),
            "c": ((2, 3), torch.long),
            "d": ((7,), torch.bool),
            "e": ((1,), torch.int32),
        },
        "cpu",
    )
    base = staged._device_buf.data_ptr()
    assert all((t.data_ptr() - base) % 16 == 0 for t in staged.device.values())
