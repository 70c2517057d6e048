"""--enable-torch-compile: each compiled function (the model's elementwise work, tailor's selection) against its
eager form at awkward shapes, and compiled engines decoding what eager ones decode.

On CPU, where the engine compiles nothing by default, Dynamo's graphs run on the aot_eager backend (AOTAutograd's
functionalized graph on eager kernels): the capture, guards, recompiles and graph breaks are the GPU's, without
Inductor's C++ builds (g++, ~1.5 s a graph: 30 s of the suite). Inductor's kernels are checked on the GPU (Triton)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from test_golden import GOLDEN, NEW_TOKENS, POLICIES, prompts

from tailorkv.kvcache.selection import EAGER, Selection
from tailorkv.models import elementwise as ew

EPS = float(torch.tensor(1e-5))  # the embedded model's, as its GGUF stores it (float32)
# bfloat16: Inductor rounds once where eager rounds each product (RoPE's x * cos + rotated * sin), a unit in the last
# place or two of a bfloat16 apart; float32: assert_close's defaults
CLOSE = {torch.float32: {}, torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def counters():
    """Dynamo's counters, imported here: torch._dynamo takes 2 s to import on every worker that collects this file."""
    from torch._dynamo.utils import counters

    return counters


@pytest.fixture(autouse=True)
def cpu_backend(request, monkeypatch):
    if request.node.callspec.params.get("device") == "cpu":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


# bfloat16 where it is served: on the GPU
CASES = [("cpu", torch.float32)] + [("cuda", d) for d in CLOSE if "cuda" in DEVICES]


@pytest.mark.parametrize("device,dtype", CASES)
def test_compiled_functions_equal_the_eager_ones(device, dtype, counters):
    """At the embedded model's widths (hidden 576, SwiGLU 1536, 9 query and 3 KV heads of 64, 8,192 positions),
    weights and tables made outside inference mode and activations inside it, as the engine runs them: the compiled
    engine below finds these graphs compiled."""
    ops, graphs = ew.Elementwise(compiled=True), counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    cos, sin, w = rand(8192, 64), rand(8192, 64), torch.nn.Parameter(rand(576), requires_grad=False)
    for t in (1, 3, 17):  # 1 is its own graph; the others share one with a dynamic length
        with torch.inference_mode():
            h, delta = rand(t, 576), rand(t, 576)
            torch.testing.assert_close(
                ops.rms_norm(h, w, EPS), ew.rms_norm(h, w, EPS), **CLOSE[dtype]
            )
            torch.testing.assert_close(
                ops.add_rms_norm(h, delta, w, EPS),
                ew.add_rms_norm(h, delta, w, EPS),
                **CLOSE[dtype],
            )
            gate_up = rand(t, 2 * 1536)
            torch.testing.assert_close(ops.silu_mul(gate_up), ew.silu_mul(gate_up), **CLOSE[dtype])
            # q and k of the fused qkv projection, read through non-contiguous views, positions out of order
            qkv, at = rand(t, 15 * 64), torch.randperm(8192, generator=gen)[:t].to(device)
            for x in (
                qkv[:, : 9 * 64].reshape(t, 9, 64),
                qkv[:, 9 * 64 : 12 * 64].reshape(t, 3, 64),
            ):
                torch.testing.assert_close(
                    ops.rope(x, cos, sin, at), ew.rope(x, cos, sin, at), **CLOSE[dtype]
                )
    assert counters["stats"]["unique_graphs"] > graphs and not counters["graph_break"]


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()  # as the engine runs it: the compiled engine below finds these graphs compiled
def test_compiled_selection_picks_what_the_eager_one_picks(device):
    """Stage 1 and 2 at GQA 3, head_dim 64, 3 rows whose ranges and own k differ, a length off any block."""
    compiled, gen = Selection(compiled=True), torch.Generator().manual_seed(1)
    q, max_abs = torch.randn(3, 6, 64, generator=gen), torch.rand(3, 2, 64, generator=gen)
    q, max_abs = q.to(device), max_abs.to(device)
    channels = EAGER.select_channels(q, max_abs, 16)
    assert torch.equal(compiled.select_channels(q, max_abs, 16), channels)
    assert torch.equal(compiled.query_channels(q, channels), EAGER.query_channels(q, channels))
    scores = torch.randn(3, 2, 997, generator=gen).to(device)
    begin, end = (
        torch.tensor([4, 0, 300], device=device),
        torch.tensor([990, 500, 310], device=device),
    )
    k_rows = torch.tensor([50, 7, 64], device=device)
    for chunk in (
        0,
        13,
    ):  # one top-k; by blocks of 13 (the last one short): candidates compiled, and the maxima off CUDA
        for got, want in zip(
            compiled.select_tokens(scores, begin, end, 64, k_rows, chunk),
            EAGER.select_tokens(scores, begin, end, 64, k_rows, chunk),
        ):
            assert torch.equal(got, want)
    idx, valid = compiled.select_tokens(scores, begin, end, 64, k_rows)
    assert valid.sum(-1).tolist() == [
        [50, 50],
        [7, 7],
        [10, 10],
    ]  # row 2's range holds 10 positions


# on CPU tailor only (its compiled model and selection; full's compiled model is the same one), 8 s of CI saved
ENGINES = [("tailor", "cpu")] + [(p, "cuda") for p in ("full", "tailor") if "cuda" in DEVICES]


@pytest.mark.parametrize("policy,device", ENGINES)
def test_compiled_engines_decode_what_eager_decodes(policy, device, counters):
    """float32: on CPU against the recorded greedy tokens (test_golden); on a GPU against an eager engine's, the
    compiled one replaying CUDA graphs that hold Inductor's kernels."""
    if device == "cpu":
        eager = [r["output_ids"] for r in json.loads(GOLDEN.read_text())[policy]]
    else:
        eager = _generate(policy, device, compiled=False)
    assert _generate(policy, device, compiled=True) == eager[: len(prompts())]
    assert counters["stats"]["unique_graphs"] and not counters["graph_break"]


def _generate(policy: str, device: str, compiled: bool) -> list[list[int]]:
    from tailorkv.engine.engine import Engine

    with Engine(
        device=device,
        dtype="float32",
        progress=False,
        kv_cache_gib=0.25,
        host_kv_gib=0.25,
        cuda_graph=compiled,
        enable_torch_compile=compiled,
        **POLICIES[policy],
    ) as engine:
        greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
        outs = engine.generate(prompts(), sampling_params=greedy)
        assert engine.runner.model.ops.compiled == compiled
        assert (getattr(engine.policy, "selection", EAGER) is not EAGER) == (
            compiled and policy == "tailor"
        )
        if device == "cuda":
            assert bool(engine.runner.graphs and engine.runner.graphs.shapes) == compiled
    return [o["output_ids"] for o in outs]
