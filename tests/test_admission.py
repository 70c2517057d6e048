"""Admission (issue 20): a request reserves its prompt and an estimate of its answer, its pages grow as it decodes,
the most recently admitted decoding request is retracted when a pool runs dry and later finishes with the same
greedy tokens, and a request that does not fit is passed by small ones at most `max_passes` times."""

from __future__ import annotations

from conftest import assert_close_logprobs

from tailorkv.engine.engine import Engine
from tailorkv.engine.request import RequestOptions
from tailorkv.engine.sampling import SamplingParams
from tailorkv.memory.layout import KVLayout
from tailorkv.memory.pages import MemoryManager, PoolSpec
from tailorkv.scheduler.scheduler import Scheduler, Seq

PAGE_BYTES = (
    2 * 4 * 16 * 2 * 32 * 4
)  # dummy:tiny's full-policy page: K and V, 4 layers, 16 tokens, float32


def scheduler(pages: int, **kw) -> Scheduler:
    layout = KVLayout([PoolSpec("kv", "gpu", pages, 16, 1, "all")])
    return Scheduler(MemoryManager(layout.pools), layout, chunk_tokens=4096, **kw)


def seq(sched: Scheduler, rid: int, prompt: int, max_new: int) -> Seq:
    s = Seq(rid, prompt, max_new)
    sched.add(s, list(range(prompt)))
    return s


def test_a_request_reserves_its_prompt_and_an_estimate_and_grows_as_it_decodes():
    sched = scheduler(64, reserve_output=20)
    s = seq(sched, 0, 30, 900)
    step = sched.schedule()
    assert len(step.admitted[0][1]["kv"]) == 4  # 30 + 20 tokens, not 30 + 900
    sched.advance(step)
    for _ in range(20):  # positions 30 .. 49 fit the 20 reserved
        s.tokens.append(7)
        step = sched.schedule()
        assert not step.grown
        sched.advance(step)
    s.tokens.append(7)
    step = sched.schedule()  # position 50: 20 more reserved, one more page
    assert [(g.rid, len(p["kv"])) for g, p in step.grown] == [(0, 1)]
    assert len(sched.memory.held[0]["kv"]) == 5


def test_the_newest_decoding_request_is_retracted_and_returns_with_its_tokens_as_prompt():
    sched = scheduler(8, reserve_output=16)  # 128 tokens
    old, new = seq(sched, 0, 40, 80), seq(sched, 1, 40, 80)
    step = sched.schedule()  # both admitted: 56 tokens (4 pages) each, the pool is full
    assert [s.rid for s, _ in step.admitted] == [0, 1]
    sched.advance(step)
    for i in range(17):  # the answer's first token came from the prefill
        for s in (old, new):
            s.tokens.append(5)
        step = sched.schedule()
        if i < 16:  # positions 40 .. 55 are reserved
            sched.advance(step)
    assert step.retracted == [new] and [s.rid for s, _ in step.grown] == [0]
    assert step.seqs == [old] and list(sched.waiting) == [new]
    assert new.prompt_len == 57 and new.num_computed == 0 and len(new.tokens) == 57
    assert sched.memory.held.keys() == {0} and sched.num_retracted == 1


def test_a_small_request_passes_one_that_does_not_fit_at_most_max_passes_times():
    sched = scheduler(16, reserve_output=16, max_passes=2)  # 256 tokens
    seq(sched, 0, 150, 16)
    sched.advance(sched.schedule())  # 11 pages held
    big = seq(sched, 1, 100, 16)  # 8 pages: not now
    small = [seq(sched, 2 + i, 5, 8) for i in range(3)]  # 1 page each, 5 are free
    step = sched.schedule()
    assert [s.rid for s, _ in step.admitted] == [2, 3]  # in the same step as if big were not there
    assert big.passed == 2 and list(sched.waiting) == [big, small[2]]
    step = sched.schedule()  # big was passed twice: the queue waits for it, though small[2] fits
    assert not step.admitted
    sched.finish(0)
    step = sched.schedule()
    assert [s.rid for s, _ in step.admitted] == [1, 4]


def test_retracted_requests_finish_with_the_tokens_they_would_have_had():
    """Four greedy requests whose answers outgrow a 16-page pool (16 answer tokens reserved at a time): some are
    retracted and computed again; every one ends with the tokens, and the logprobs (to 1e-4), of a run with room for
    all."""
    prompts = [[1 + i, 40 + 3 * i, 900 + i] * 7 for i in range(4)]  # 21 tokens each
    params = {"max_new_tokens": 60, "temperature": 0, "ignore_eos": True}
    with Engine(model="dummy:tiny", progress=False, kv_cache_gib=64 * PAGE_BYTES / 2**30) as roomy:
        sp = SamplingParams.from_any(params)
        want = [roomy.add_request(p, sp, RequestOptions(0, logprob_start=0)) for p in prompts]
        while not all(r.finished for r in want):
            roomy.step()
        expected = [r.output_ids for r in want]
    tight = Engine(
        model="dummy:tiny",
        progress=False,
        kv_cache_gib=16 * PAGE_BYTES / 2**30,
        reserve_output_tokens=16,
        enable_prefix_caching=False,
    )
    with tight:
        assert tight.memory.pools["kv"].num_pages == 16
        sp = SamplingParams.from_any(params)
        reqs = [tight.add_request(p, sp, RequestOptions(0, logprob_start=0)) for p in prompts]
        while not all(r.finished for r in reqs):
            tight.step()
        assert tight.scheduler.num_retracted >= 2
        assert [r.output_ids for r in reqs] == expected
        for r, w in zip(reqs, want):
            assert_close_logprobs(r.output_logprobs, w.output_logprobs)
        # a retracted request's prompt is prefilled again, but its prompt logprobs are not scored twice
        assert [len(r.input_logprobs) for r in reqs] == [len(p) for p in prompts]
        assert all(len(r.output_logprobs) == 60 for r in reqs)
        assert tight.memory.pools["kv"].num_free == 16


def test_an_answer_without_max_tokens_runs_to_the_end_of_the_kv_memory():
    """A chat request without max_tokens gets Engine.max_output tokens: the pool's end before the context's."""
    with Engine(model="dummy:tiny", progress=False, kv_cache_gib=16 * PAGE_BYTES / 2**30) as e:
        assert e.max_output(21) == 16 * 16 - 21 < e.config.max_position - 21
        out = e.generate(
            input_ids=[5] * 21,
            sampling_params={"max_new_tokens": e.max_output(21), "ignore_eos": True},
        )
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert len(out["output_ids"]) == 16 * 16 - 21
