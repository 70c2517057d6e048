"""Which shapes DecodeGraphs captures, and when, on CPU (pinned there: float32 equality, CPU defaults): a capture
there is its warm pass, and a replay runs the captured segments eagerly with the step they were captured with (the
Python values a CUDA graph bakes in), reading the same static tensors. tests/test_gpu.py runs the real graphs."""

from __future__ import annotations

import pytest
import torch
from test_tailor import GREEDY, SKETCH2, SMALL

from tailorkv.engine.cuda_graph import DecodeGraphs, _Captured
from tailorkv.engine.engine import Engine
from tailorkv.engine.request import SamplingParams


class _Replay:
    def __init__(self, graphs: DecodeGraphs, shape: _Captured, j: int, step):
        self.run = lambda: graphs._segment(shape, j, step)

    def replay(self) -> None:
        self.run()


class CpuGraphs(DecodeGraphs):
    """DecodeGraphs whose captures replay eagerly; `captures`: the decode step of each capture, in the order of
    `shapes`; `calls`: per decode step, (may it capture, did it replay) and its rows' (bucket, shape key)."""

    def __init__(self, e: Engine, monkeypatch):
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
        super().__init__(e.model, e.policy, e.device, max_rows=8)
        self.captures: list[int] = []
        self.calls: list[tuple[bool, bool, tuple]] = []

    def run(self, ids, batch, capture=True):
        rows = next(b for b in self.buckets if b >= batch.size)
        key = (rows, self.policy.graph_key(batch, 0))
        out = super().run(ids, batch, capture)
        self.calls.append((capture, out is not None, key))
        return out

    def _capture(self, rows, ids, step):
        self.captures.append(len(self.calls))
        shape, n = _Captured(rows, len(self.eager), self.device), step.batch.size
        shape.ids[:n].copy_(ids)
        shape.positions[:n].copy_(step.batch.positions)
        for j in range(len(self.eager) + 1):  # the warm pass
            self._segment(shape, j, step)
            if j < len(self.eager):
                shape.attn.append(torch.zeros_like(shape.qkv[j][0]))
        shape.graphs = [_Replay(self, shape, j, step) for j in range(len(self.eager) + 1)]
        return shape

    def captured_before_use(self) -> list[tuple[int, int]]:
        """(capture step, first step that used it) of every shape the steps used."""
        first: dict[tuple, int] = {}
        for at, (*_, key) in enumerate(self.calls):
            first.setdefault(key, at)
        at = dict(zip(self.shapes, self.captures))
        return [(at[key], used) for key, used in first.items()]


@pytest.fixture(scope="module")
def prompt():
    from tailorkv.essays import load_essays

    return load_essays()[
        :2000
    ]  # ~460 tokens: 70 more cross 512, a power of two of the Q layers' 64-token pages


@pytest.mark.parametrize("options, shapes", [(SKETCH2, 3), ({"kv_policy": "kivi"}, 2)])
def test_decode_only_steps_capture_the_next_shape_before_the_rows_need_it(
    prompt, options, shapes, monkeypatch
):
    """Two rows generate 70 tokens, past the Q layers' page width (~10 tokens before the 64-token generated
    bucket of tailor's S layers): each shape they need from then on, the one between the two crossings too, is
    captured in an earlier decode-only step, one capture a step, and the greedy tokens equal an engine's without
    graphs."""
    prompts, sp = [prompt, prompt[:700]], {**GREEDY, "max_new_tokens": 70}
    with Engine(**SMALL, **options, enable_prefix_caching=False, device="cpu") as e:
        want = [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)]
        e.runner.graphs = graphs = CpuGraphs(e, monkeypatch)
        assert [r["output_ids"] for r in e.generate(prompts, sampling_params=sp)] == want
    pairs = graphs.captured_before_use()
    assert len(pairs) == shapes
    assert pairs[0] == (0, 0) and all(c < used for c, used in pairs[1:])
    assert len(graphs.captures) == len(set(graphs.captures))  # one capture a step


def test_steps_beside_a_long_prompt_replay_the_shapes_captured_ahead(prompt, monkeypatch):
    """Two rows decode; at their 30th token a third prompt arrives, prefilled in 8-token chunks over ~38 steps
    while the rows cross the Q layers' page width and the 64-token generated bucket. Those steps may not capture,
    yet every one replays the decode rows (the shapes were captured ahead), and each request's greedy tokens equal
    an engine's without graphs on the same schedule."""
    sp = SamplingParams(max_new_tokens=70, temperature=0, ignore_eos=True)
    outs = []
    for graphed in (False, True):
        with Engine(**SMALL, **SKETCH2, enable_prefix_caching=False, device="cpu") as e:
            ids = [e.tokenizer.encode(p) for p in (prompt, prompt[:700], prompt[700:])]
            if graphed:
                e.runner.graphs = graphs = CpuGraphs(e, monkeypatch)
            reqs = [e.add_request(x, sp) for x in ids[:2]]
            while len(reqs[0].output_ids) < 30:
                e.step()
            e.scheduler.chunk_tokens = 8
            reqs.append(e.add_request(ids[2], sp))
            while e.has_work:
                e.step()
            outs.append([r.output_ids for r in reqs])
    assert outs[1] == outs[0]
    mixed = [c for c in graphs.calls if not c[0]]
    assert len(mixed) >= 35 and all(replayed for _, replayed, _ in mixed)
    assert (
        len({key for *_, key in mixed}) >= 3
    )  # the rows' shape changed twice beside the prompt's chunks
