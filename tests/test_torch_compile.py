"""--enable-torch-compile: each compiled elementwise function against its eager form at awkward shapes, and engines
that run compiled decoding the recorded greedy tokens of the embedded model."""

from __future__ import annotations

import json

import pytest
import torch
from test_golden import GOLDEN, NEW_TOKENS, POLICIES, prompts
from torch._dynamo.utils import counters

from tailorkv.models import elementwise as ew

EPS = 1e-5
# bfloat16: Inductor rounds once where eager rounds each product (RoPE's x * cos + rotated * sin), a unit in the last
# place or two of a bfloat16 apart; float32: assert_close's defaults
CLOSE = {torch.float32: {}, torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() else []
)  # Inductor's C++, and Triton on a GPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_functions_equal_the_eager_ones(dtype, device):
    ops, graphs = ew.Elementwise(compiled=True), counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    cos, sin = rand(1000, 64), rand(1000, 64)
    for t in (1, 3, 17):  # 1 is its own graph; the others share one with a dynamic length
        h, delta, w = rand(t, 192), rand(t, 192), rand(192)
        torch.testing.assert_close(ops.rms_norm(h, w, EPS), ew.rms_norm(h, w, EPS), **CLOSE[dtype])
        torch.testing.assert_close(
            ops.add_rms_norm(h, delta, w, EPS), ew.add_rms_norm(h, delta, w, EPS), **CLOSE[dtype]
        )
        gate_up = rand(t, 2 * 96)
        torch.testing.assert_close(ops.silu_mul(gate_up), ew.silu_mul(gate_up), **CLOSE[dtype])
        # q of the fused qkv projection: 3 heads of 64 read through a non-contiguous view, positions out of order
        q = rand(t, 5 * 64)[:, : 3 * 64].reshape(t, 3, 64)
        at = torch.randperm(1000, generator=gen)[:t].to(device)
        torch.testing.assert_close(
            ops.rope(q, cos, sin, at), ew.rope(q, cos, sin, at), **CLOSE[dtype]
        )
    assert counters["stats"]["unique_graphs"] > graphs and not counters["graph_break"]


@pytest.mark.parametrize("policy", ["full", "tailor"])
def test_compiled_engines_decode_the_recorded_tokens(policy):
    from tailorkv.engine.engine import Engine

    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
    with Engine(
        progress=False,
        kv_cache_gib=0.25,
        host_kv_gib=0.25,
        enable_torch_compile=True,
        **POLICIES[policy],
    ) as engine:
        assert engine.runner.model.ops.compiled
        outs = engine.generate(prompts(), sampling_params=greedy)
    recorded = json.loads(GOLDEN.read_text())[policy][: len(outs)]
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in recorded]
    assert counters["stats"]["unique_graphs"] and not counters["graph_break"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["full", "tailor"])
def test_compiled_graphs_decode_what_eager_decodes_on_gpu(policy):
    """float32 on the GPU: decode replayed from CUDA graphs that hold Inductor's kernels (prompts chunked at 256
    tokens, so the graphs also replay beside eager prompt chunks) against eager decode without torch.compile."""
    from tailorkv.engine.engine import Engine

    outs = []
    for compiled in (False, True):
        with Engine(
            device="cuda",
            dtype="float32",
            progress=False,
            cuda_graph=compiled,
            enable_torch_compile=compiled,
            chunked_prefill_size=256,
            step_budget_ms=0,
            **POLICIES[policy],
        ) as engine:
            greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
            outs.append(
                [o["output_ids"] for o in engine.generate(prompts(), sampling_params=greedy)]
            )
            assert bool(engine.runner.graphs and engine.runner.graphs.shapes) == compiled
    assert outs[1] == outs[0]
