"""The batched sampler: seeded rows draw exactly as a row alone, unseeded rows in one batched draw that honours
top-k / top-p / min-p, logits processors, logprobs, and a bad row that falls back to greedy alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tailorkv.engine.sampling import SamplingParams, sample

VOCAB = 1000


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator | None = None
    logits_processors: list = field(default_factory=list)
    top_logprobs_num: int | None = None
    forced_token: int | None = None


def seeded(seed: int, **params) -> Row:
    return Row(SamplingParams(**params), torch.Generator().manual_seed(seed))


def logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw(x: torch.Tensor, rows: list[Row], seed: int = 0) -> list[int]:
    return [s.token for s in sample(x, rows, torch.Generator().manual_seed(seed))]


SEEDED = [
    {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    {"temperature": 1.3, "min_p": 0.05},
    {"temperature": 1.0},
]


def reference(row: torch.Tensor, p: dict, gen: torch.Generator) -> int:
    """The per-row sampler a seed was recorded with: temperature, top-k, softmax, min-p, top-p, one draw."""
    sp = SamplingParams(**p)
    row = row / sp.temperature
    if sp.top_k > 0:
        row = row.masked_fill(row < torch.topk(row, sp.top_k).values[-1], float("-inf"))
    probs = torch.softmax(row, -1)
    if sp.min_p > 0:
        probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0)
    if sp.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        probs = probs.scatter(
            0, idx, sorted_p.masked_fill(sorted_p.cumsum(0) - sorted_p > sp.top_p, 0)
        )
    return int(torch.multinomial(probs, 1, generator=gen).item())


def test_seeded_rows_draw_as_alone_whatever_the_batch():
    x = logits(6)
    rows = [seeded(10 + i, **SEEDED[i % 3]) for i in range(3)]
    rows += [Row(SamplingParams(temperature=0.7)), Row(SamplingParams(temperature=0))]
    rows += [Row(SamplingParams(top_k=5))]
    got = [draw(x, rows) for _ in range(4)]  # the same generators, four steps
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        assert [g[i] for g in got] == [reference(x[i], SEEDED[i], gen) for _ in range(4)]
    assert all(g[4] == int(x[4].argmax()) for g in got)


def test_unseeded_rows_honour_top_k_top_p_and_min_p():
    x = logits(1).repeat(4, 1)
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True).tolist()
    nucleus = order[: int((probs.sort(descending=True).values.cumsum(0) < 0.5).sum()) + 1]
    rows = [
        Row(SamplingParams(top_k=3)),
        Row(SamplingParams(top_p=0.5)),
        Row(SamplingParams(min_p=0.5)),
        Row(SamplingParams(temperature=1e-3)),
    ]
    seen = [set() for _ in rows]
    for seed in range(200):
        for s, t in zip(seen, draw(x, rows, seed)):
            s.add(t)
    assert seen[0] == set(order[:3])
    assert seen[1] == set(nucleus) and len(nucleus) > 1
    assert seen[2] == {t for t in order if probs[t] >= 0.5 * probs.max()}
    assert seen[3] == {order[0]}


def test_one_batched_draw_matches_the_distribution():
    x = torch.tensor([[0.0, 1.0, 2.0, -1e9]]).repeat(2, 1)
    rows = [Row(SamplingParams(temperature=1.0)), Row(SamplingParams(temperature=2.0))]
    counts = torch.zeros(2, 4)
    for seed in range(2000):
        for i, t in enumerate(draw(x, rows, seed)):
            counts[i, t] += 1
    expected = torch.stack([torch.softmax(x[0], -1), torch.softmax(x[0] / 2, -1)])
    assert counts[:, 3].sum() == 0
    assert torch.allclose(counts / 2000, expected, atol=0.04)


def test_a_degenerate_row_falls_back_to_greedy_alone():
    x = logits(3, seed=1)
    good = [seeded(1, **SEEDED[0]), seeded(2, **SEEDED[1])]
    alone = draw(x[[0, 2]], good)
    good = [seeded(1, **SEEDED[0]), seeded(2, **SEEDED[1])]
    for bad in (Row(SamplingParams(temperature=1e-40)), seeded(3, temperature=1e-40)):
        rows = [good[0], bad, good[1]]
        for g, s in zip(good, (1, 2)):
            g.generator.manual_seed(s)
        got = draw(x, rows)
        assert got == [alone[0], int(x[1].argmax()), alone[1]]


def mask_all(row: torch.Tensor) -> torch.Tensor:
    return torch.full_like(row, float("-inf"))


def ban(token: int):
    def fn(row: torch.Tensor) -> torch.Tensor:
        return row.index_fill(0, torch.tensor([token]), float("-inf"))

    return fn


def test_logits_processors_apply_per_row():
    x = logits(3)
    best = x.argmax(-1).tolist()
    rows = [
        Row(SamplingParams(temperature=0), logits_processors=[ban(best[0])]),
        Row(SamplingParams(temperature=0)),
        Row(SamplingParams(temperature=0), logits_processors=[mask_all]),
    ]
    got = draw(x, rows)
    assert got == [
        int(x[0].index_fill(0, torch.tensor([best[0]]), -1e9).argmax()),
        best[1],
        best[2],
    ]
    rows[2].params = SamplingParams(
        temperature=0.5
    )  # all -inf for a sampled row: greedy on raw logits
    assert draw(x, rows)[2] == best[2]


@pytest.mark.parametrize("forced", [None, 7])
def test_logprobs_are_of_the_raw_logits(forced):
    x = logits(2)
    rows = [
        Row(SamplingParams(temperature=0), top_logprobs_num=3, forced_token=forced),
        Row(SamplingParams(temperature=0), logits_processors=[ban(int(x[1].argmax()))]),
    ]
    rows[1].top_logprobs_num = 0
    a, b = sample(x, rows, torch.Generator())
    lp = torch.log_softmax(x, -1)
    top = lp[0].topk(3)
    assert a.token == (int(x[0].argmax()) if forced is None else forced)
    assert a.logprob == float(lp[0, a.token])
    assert a.top_logprobs == list(zip(top.indices.tolist(), top.values.tolist()))
    assert b.logprob == float(lp[1, b.token]) and b.top_logprobs is None
    assert b.token != int(x[1].argmax())


class Letters:
    """A tokenizer stand-in: token t is the letter chr(97 + t); token 25 ends a generation."""

    eos_token_ids = [25]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t) for t in ids)

    decode_continuation = decode


def test_a_request_keeps_the_logprobs_it_asked_for():
    from tailorkv.engine.request import Request
    from tailorkv.engine.sampling import Sample
    from tailorkv.scheduler.scheduler import Seq

    req = Request(0, [1], SamplingParams(max_new_tokens=5), Seq(0, 1, 5), top_logprobs_num=1)
    for s in (Sample(2, -0.5, [(2, -0.5)]), Sample(3, -1.5, [(4, -0.25)]), Sample(25, -2.0, [])):
        req.append(s, Letters())
    meta = req.result()["meta_info"]
    assert req.text == "cd" and req.finish_reason == {"type": "stop", "matched": 25}
    assert meta["output_token_logprobs"] == [
        [-0.5, 2, None],
        [-1.5, 3, None],
    ]  # not the stop token's
    assert meta["output_top_logprobs"] == [[[-0.5, 2, None]], [[-0.25, 4, None]]]
    assert (
        "output_token_logprobs"
        not in Request(1, [1], SamplingParams(), Seq(1, 1, 5)).result()["meta_info"]
    )


def test_processed_logprobs_follow_the_temperature():
    """logprobs_mode "processed": the chosen token's logprob is log_softmax(logits / temperature), as vLLM's
    processed_logprobs; "raw" (the default) is log_softmax(logits)."""
    import dataclasses

    from tailorkv.engine.engine import Engine
    from tailorkv.engine.request import RequestOptions

    prompt = [5, 17, 230, 9, 41]
    sp = SamplingParams(max_new_tokens=1, temperature=0.5, seed=3)
    with Engine(model="dummy:tiny", progress=False) as e:
        logits = e.next_token_logits(prompt)
        for mode, scale in (("raw", 1.0), ("processed", 0.5)):
            e.options = dataclasses.replace(e.options, logprobs_mode=mode)
            req = e.add_request(prompt, sp, RequestOptions(top_logprobs_num=0))
            while not req.finished:
                e.step()
            want = torch.log_softmax(logits / scale, -1)[req.output_ids[0]].item()
            assert req.output_logprobs[0] == pytest.approx(want, abs=1e-5)
