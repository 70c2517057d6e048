"""The overlap schedule (engine/overlap.py): decode steps launched before the previous step's tokens reach the host
give every request the tokens, finish reasons and text of the step-by-step engine (the embedded model, greedy, a
seeded sampled row, stop strings and stop ids, a penalised row with logprobs, a request arriving while others
decode with forced tokens); a retraction waits for the tokens in flight; an abort during a step in flight frees every page. The
API tests' server (conftest.py live_server) runs the overlap schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_logprobs

from tailorkv.config import EngineConfig
from tailorkv.engine.engine import Engine
from tailorkv.engine.request import RequestOptions
from tailorkv.engine.sampling import SamplingParams
from tailorkv.engine.warm_up import warm_up
from tailorkv.errors import ConfigError

PROMPTS = [f"Fact {i}: the number {7 * i + 3} is" for i in range(4)] + [
    "Name an animal:",
    "Write a long story about a cat.",
    "List three colours:",
]
PARAMS = [{"max_new_tokens": 6 + 4 * i, "temperature": 0} for i in range(4)] + [
    {"max_new_tokens": 16, "temperature": 0, "regex": "( [a-z]+){1,3}\\."},  # a grammar's mask
    {"max_new_tokens": 14, "temperature": 0.8, "seed": 5},
    {"max_new_tokens": 12, "temperature": 0, "frequency_penalty": 1.0},  # a logits processor
]
PARAMS[3]["stop"] = ["prime"]
PARAMS[1]["stop_token_ids"] = [198]  # "\n"
LATE = ("The capital of France is", {"max_new_tokens": 8, "temperature": 0})


def free_pages(engine: Engine) -> list[int]:
    return [t["free_pages"] - t["total_pages"] for t in engine.memory.usage().values()]


def run(engine: Engine) -> list[tuple]:
    """PROMPTS (the last one with 2 top logprobs), then LATE added after 8 steps with 8 forced tokens; each
    request's (ids, finish reason, text, logprobs, top logprobs)."""
    reqs = [
        engine.add_request(
            engine.tokenize(p, None),
            SamplingParams.from_any(sp),
            RequestOptions(top_logprobs_num=2 if i == len(PROMPTS) - 1 else None),
        )
        for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))
    ]
    for _ in range(8):
        engine.step()
    late = engine.add_request(engine.tokenize(LATE[0], None), SamplingParams.from_any(LATE[1]))
    late.forced_ids = list(range(1000, 1008))
    reqs.append(late)
    while not all(r.finished for r in reqs):
        engine.step()
    engine.step()  # lands the step still in flight
    assert not engine.has_work and free_pages(engine) == [0] * len(free_pages(engine))
    return [
        (r.output_ids, r.finish_reason, r.text, r.output_logprobs, r.output_top_logprobs)
        for r in reqs
    ]


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    """Tokens, finish reasons and text exactly; logprobs to 1e-4 (an ended request's extra row changes its batch's
    shapes, hence float rounding: 7e-7 measured for tailor on CPU)."""
    assert [g[:3] for g in got] == [w[:3] for w in want]
    g, w = got[-2], want[-2]  # the row with logprobs
    assert_close_logprobs(g[3], w[3])
    assert [[t for t, _ in top] for top in g[4]] == [[t for t, _ in top] for top in w[4]]
    assert_close_logprobs([v for top in g[4] for _, v in top], [v for top in w[4] for _, v in top])
    assert not any(g[3] for g in got[:-2] + got[-1:])


@pytest.mark.parametrize("policy", ["full", "tailor"])
def test_overlap_schedule_decodes_what_the_step_by_step_engine_decodes(policy):
    kw = dict(kv_policy=policy, device="cpu", progress=False, kv_cache_gib=0.25, host_kv_gib=0.5)
    with Engine(**kw) as e:
        want = run(e)
        decode_steps = e.step_log.decode_steps
        assert e.step_log.overlapped_steps == 0 and decode_steps >= 12
    with Engine(**kw, overlap_schedule=True) as e:
        assert_same(run(e), want)
        # every step without a prompt (all but the first and LATE's)
        assert e.step_log.overlapped_steps == e.step_log.decode_steps == decode_steps
    # a stop id, EOS, a stop string, the grammar's end
    assert [f["type"] for _, f, *_ in want[1:5]] == ["stop"] * 4 and want[4][2].endswith(".")
    assert (
        len(want[-2][3]) == 12
        and len(want[-2][4][0]) == 2
        and want[-1][0][:3] == [1000, 1001, 1002]
    )


def test_a_retraction_waits_for_the_tokens_in_flight():
    """Four answers outgrow a 16-page pool: requests are retracted between overlapped steps and still end with the
    tokens and logprobs (to 1e-4) of a run with room for all (dummy:tiny: a token lost or doubled shifts them)."""
    prompts = [[1 + i, 40 + 3 * i, 900 + i] * 7 for i in range(4)]
    sp = SamplingParams.from_any({"max_new_tokens": 60, "temperature": 0, "ignore_eos": True})
    logprobs = RequestOptions(top_logprobs_num=0)
    with Engine(model="dummy:tiny", device="cpu", progress=False, kv_cache_gib=0.01) as roomy:
        want = [roomy.add_request(p, sp, logprobs) for p in prompts]
        while roomy.has_work:
            roomy.step()
        page = (
            roomy.memory.usage()["gpu"]["total_bytes"] / roomy.memory.usage()["gpu"]["total_pages"]
        )
    tight = Engine(
        model="dummy:tiny",
        device="cpu",
        progress=False,
        kv_cache_gib=16 * page / 2**30,
        reserve_output_tokens=16,
        enable_prefix_caching=False,
        overlap_schedule=True,
    )
    with tight:
        reqs = [tight.add_request(p, sp, logprobs) for p in prompts]
        while tight.has_work:
            tight.step()
        assert tight.scheduler.num_retracted >= 2 and tight.step_log.overlapped_steps > 30
        assert [r.output_ids for r in reqs] == [w.output_ids for w in want]
        for r, w in zip(reqs, want):
            assert_close_logprobs(r.output_logprobs, w.output_logprobs)
        assert free_pages(tight) == [0]


def test_an_abort_while_its_step_is_in_flight_frees_every_page():
    """The others go on with their tokens (the next step's rows are no longer the in-flight step's: their tokens
    are picked out of it), and every page is freed."""
    params = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    sp = SamplingParams.from_any(params)
    with Engine(device="cpu", progress=False, kv_cache_gib=0.25) as plain:
        want = [o["output_ids"] for o in plain.generate(PROMPTS[:3], sampling_params=params)]
    with Engine(device="cpu", progress=False, kv_cache_gib=0.25, overlap_schedule=True) as e:
        reqs = [e.add_request(e.tokenize(p, None), sp) for p in PROMPTS[:3]]
        while e.step_log.overlapped_steps < 3:
            e.step()
        assert e._inflight is not None and reqs[1].rid in e._inflight.rows
        got = len(reqs[1].output_ids)
        e.abort(reqs[1].rid)
        while e.has_work:
            e.step()
        assert reqs[1].finish_reason["type"] == "abort" and len(reqs[1].output_ids) == got
        assert [reqs[0].output_ids, reqs[2].output_ids] == [want[0], want[2]]
        assert free_pages(e) == [0]


def test_overlap_schedule_is_one_rank_only():
    with pytest.raises(ConfigError, match="one rank"):
        EngineConfig(model="dummy:tiny", overlap_schedule=True, tp_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["full", "tailor"])
def test_overlapped_cuda_graph_steps_decode_what_synced_steps_decode(policy):
    """On the GPU the launched step reads the tokens of the step before from the device, while the host schedules
    and fills the next step's inputs (pinned staging buffers, graph replays); the schedule is CUDA's default."""
    kw = dict(kv_policy=policy, device="cuda", dtype="float32", progress=False, kv_cache_gib=1)
    with Engine(**kw, host_kv_gib=1, overlap_schedule=False) as e:
        want = run(e)
        assert e.step_log.overlapped_steps == 0
    with Engine(**kw, host_kv_gib=1) as e:
        assert_same(run(e), want)
        assert e.runner.graphs.shapes and e.step_log.overlapped_steps >= 10


def test_warm_up_lands_its_last_step():
    with Engine(device="cpu", progress=False, kv_cache_gib=0.25, overlap_schedule=True) as e:
        warm_up(e)
        assert e.step_log.overlapped_steps > 0 and not e.has_work and not e.requests
        assert free_pages(e) == [0]
