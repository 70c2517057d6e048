"""CUDA-graph decode: a decode step replayed from graphs captured once per (padded batch size, policy shape key).

The step is cut into segments at the layers whose attention the policy runs eagerly (every layer for `full`, whose
FlashInfer decode is planned per step; none for `tailor` and `kivi`, whose offloaded layers (with their side-stream
prefetch) and quantized layers (one paged kernel for all rows) run inside the graph). A segment runs from the
previous eager attention's output through the MLPs, norms, projections and graph-safe attentions up to the next
eager layer's q, k, v. All segments of a shape share one memory pool, so what one segment leaves for the next
stays put between replays. A batch is padded to the next bucket of rows; padding rows compute garbage that nobody
reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..kvcache.batch import ForwardBatch, StepState
from ..kvcache.policy import KVPolicy
from ..models.llama import LlamaModel

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# steps that may not capture (they also compute prompt chunks) run a shape without a graph eagerly at most this many
# times; then one captures it anyway: under steady prompt traffic a decode-only step may not come soon
MAX_DEFERRED = 32
# a decode-only step whose shape has a graph captures a shape its rows will pass through within this many tokens
# (the nearest missing one, one a step): a 126k prompt's ~70 chunk steps beside the users, which may not capture,
# then find the shapes they need
AHEAD = 128


class _Captured:
    """The static tensors and graphs of one captured shape."""

    def __init__(self, rows: int, eager: int, device):
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        # per eager layer: the q, k, v its segment produced, the residual stream at it, and where its attention
        # output is put for the next segment
        self.qkv: list[tuple | None] = [None] * eager
        self.h: list[torch.Tensor | None] = [None] * eager
        self.attn: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, policy: KVPolicy, device: torch.device, max_rows: int):
        self.model, self.policy, self.device = model, policy, device
        in_graph = policy.graph_attention_layers()
        self.eager = [i for i in range(len(model.layers)) if i not in in_graph]
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.shapes: dict[tuple, _Captured] = {}
        # shapes without a graph: the steps that ran them eagerly
        self.deferred: dict[tuple, int] = {}
        # steps whose decode rows ran eagerly for want of a graph (all shapes, ever)
        self.eager_steps = 0
        self.pool = torch.cuda.graph_pool_handle()
        # (rids, rows, their key AHEAD tokens on) once every shape up to that key has a graph
        self.ahead_done: tuple | None = None

    def run(
        self, ids: torch.Tensor, batch: ForwardBatch, capture: bool = True
    ) -> tuple[torch.Tensor, StepState] | None:
        """Hidden states [B, hidden] of a decode batch and the step's state (from the policy's
        `prepare_for_graph`), or None when this step must run eagerly: the policy cannot graph it, or its shape
        has no graph yet and `capture` is False (at most MAX_DEFERRED times a shape)."""
        rows = next((b for b in self.buckets if b >= batch.size), None)
        prepared = None if rows is None else self.policy.prepare_for_graph(batch, rows)
        if prepared is None:
            return None
        step, key = prepared
        shape = self.shapes.get((rows, key))
        n = batch.size
        if shape is None:
            deferred = self.deferred.get((rows, key), 0)
            if not capture and deferred < MAX_DEFERRED:
                self.deferred[(rows, key)] = deferred + 1
                self.eager_steps += 1
                return None
            self.deferred.pop((rows, key), None)
            shape = self.shapes[(rows, key)] = self._capture(rows, ids, step)
        elif capture:
            self._capture_ahead(ids, batch, rows, key)
        # padding rows keep earlier ids and positions: valid, and nobody reads their output
        shape.ids[:n].copy_(ids)
        shape.positions[:n].copy_(batch.positions)
        shape.graphs[0].replay()
        for j, layer in enumerate(self.eager):
            q, k, v = shape.qkv[j]
            shape.attn[j][:n].copy_(self.policy.attend(layer, q[:n], k[:n], v[:n], step))
            shape.graphs[j + 1].replay()
        return shape.hidden[:n], step

    def _capture_ahead(self, ids: torch.Tensor, batch: ForwardBatch, rows: int, key: tuple) -> None:
        """Capture the nearest shape without a graph that this batch's rows pass through within AHEAD tokens. It
        holds this step's rows too, so its warm pass computes this step once more (the KV writes are idempotent),
        before the replay that this step's outputs come from."""
        last = self.policy.graph_key(batch, AHEAD)
        if last is None or (tuple(batch.rids), rows, last) == self.ahead_done:
            return
        for ahead, later in self._shapes_ahead(batch, key, last):
            if (rows, later) not in self.shapes:
                step, later = self.policy.prepare_for_graph(batch, rows, ahead)
                self.deferred.pop((rows, later), None)
                self.shapes[(rows, later)] = self._capture(rows, ids, step)
                return
        self.ahead_done = (tuple(batch.rids), rows, last)

    def _shapes_ahead(
        self, batch: ForwardBatch, key: tuple, last: tuple
    ) -> Iterator[tuple[int, tuple]]:
        """(tokens ahead, key) where the rows' key changes within AHEAD tokens, nearest first, each found when asked
        for. A key only grows (its sizes are the longest row's), so each change is found by bisection."""
        at, lo = key, 0
        while at != last:
            hi = AHEAD  # the key there differs from `at`; at `lo` it equals it
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.policy.graph_key(batch, mid) == at else (lo, mid)
            at, lo = self.policy.graph_key(batch, hi), hi
            yield hi, at

    def _segment(self, shape: _Captured, j: int, step: StepState) -> None:
        m, kv, e = self.model, self.policy, self.eager
        if j == 0:
            h, first = m.model.embed_tokens(shape.ids), 0
        else:
            h, first = m.layer_output(e[j - 1], shape.h[j - 1], shape.attn[j - 1]), e[j - 1] + 1
        last = e[j] if j < len(e) else len(m.layers)
        for i in range(first, last):
            h = m.layer_output(
                i, h, kv.attend(i, *m.attention_inputs(i, h, shape.positions, kv, step), step)
            )
        if j < len(e):
            shape.qkv[j], shape.h[j] = m.attention_inputs(last, h, shape.positions, kv, step), h
        else:
            shape.hidden = m.final_norm(h)
        kv.join_streams(step)

    def _capture(self, rows: int, ids: torch.Tensor, step: StepState) -> _Captured:
        shape = _Captured(rows, len(self.eager), self.device)
        n = step.batch.size
        shape.ids[:n].copy_(ids)
        shape.positions[:n].copy_(step.batch.positions)
        main = torch.cuda.current_stream(self.device)
        # one eager pass over all segments first (kernels compile, cuBLAS picks plans), then one captured pass: a
        # segment may hand state to the next (tailor's stage-1 prefetch, in `step`), so each pass runs them in order
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(main)
        with torch.cuda.stream(warm):
            for j in range(len(self.eager) + 1):
                self._segment(shape, j, step)
                if j < len(self.eager):
                    shape.attn.append(torch.zeros_like(shape.qkv[j][0]))
        main.wait_stream(warm)
        for j in range(len(self.eager) + 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._segment(shape, j, step)
            shape.graphs.append(graph)
        return shape
