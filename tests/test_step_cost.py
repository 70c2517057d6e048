"""Chunk sizing to a step-time budget (issue 19, item 4): the cost model fitted from step times, the scheduler's
chunks shrinking as a prompt's prefix grows while others decode, and greedy tokens unchanged by it."""

from __future__ import annotations

import math

import pytest

from tailorkv.engine.engine import Engine
from tailorkv.engine.sampling import SamplingParams
from tailorkv.memory.layout import KVLayout
from tailorkv.memory.pages import MemoryManager, PoolSpec
from tailorkv.models.dummy import dummy_config
from tailorkv.scheduler.scheduler import Scheduler, Seq
from tailorkv.scheduler.step_cost import GROWTH, MIN_CHUNK, StepCost

LLAMA8B = dummy_config("llama-3.1-8b")


def measured(budget_s: float = 0.2) -> StepCost:
    """The 8B model's cost model after the steps the H200 ran (2,048 tokens after 100k in 0.29 s, decode 17 ms)."""
    cost = StepCost.for_model(LLAMA8B, budget_s)
    cost.observe([], 8, 0.017)
    cost.observe([(2048, 100_000)], 8, 0.29)
    return cost


def test_flops_count_the_linear_part_and_the_attention_over_the_prefix():
    cost = StepCost.for_model(LLAMA8B, 0.2)
    assert cost.linear == pytest.approx(
        2 * 6.98e9, rel=0.01
    )  # the 8B model's layers, embeddings left out
    assert cost.pair == 4 * 32 * 32 * 128
    late, early = cost.flops(2048, 120_000), cost.flops(2048, 0)
    assert late > 3 * early  # a late chunk of a 128k prompt is mostly attention


def test_the_rate_is_fitted_from_steps_and_unlimited_until_measured():
    cost = StepCost.for_model(LLAMA8B, 0.2)
    assert cost.rate is None and math.isinf(cost.allowance(decoding=True))
    cost.observe([], 4, 0.02)
    cost.observe([(2048, 0)], 4, 0.12)
    assert cost.decode_s == 0.02
    assert cost.rate == pytest.approx(0.10 / cost.flops(2048, 0))
    # the line would allow 0.18 / rate (1.8x that step's flops); a step grows past what one did within the budget
    # by GROWTH at most
    assert cost.allowance(decoding=True) == pytest.approx(GROWTH * cost.flops(2048, 0))
    cost.observe([(4096, 0)], 4, 0.22)  # over the budget: no reach
    assert cost.allowance(decoding=True) == pytest.approx(GROWTH * cost.flops(2048, 0))
    cost.observe([(2048, 0)], 4, 5.0)  # one step that also compiled something
    cost.observe([(2048, 0)], 4, 0.12)
    assert cost.rate == pytest.approx(0.10 / cost.flops(2048, 0))  # the median of three
    assert math.isinf(cost.allowance(decoding=False))  # nobody waits for a token
    assert math.isinf(StepCost.for_model(LLAMA8B, 0).allowance(decoding=True))  # budget off


@pytest.mark.parametrize("sms", [0, 132, 78])  # a CPU, an H100, and SMs that no head count divides
@pytest.mark.parametrize("prefix", [0, 1000, 64_000, 126_000])
@pytest.mark.parametrize("flops", [1e9, 3e13, 4e14, 1.2e14, 1.6e14])
def test_tokens_within_is_the_largest_that_fits(prefix, flops, sms):
    cost = StepCost.for_model(LLAMA8B, 0.2, sms)
    n = cost.tokens_within(flops, prefix)
    assert cost.flops(n, prefix) <= flops < cost.flops(n + 1, prefix)


def test_on_a_gpu_attention_costs_whole_waves_of_query_tiles_and_chunks_end_at_a_wave():
    """The H100's 132 SMs and the 8B model's 32 heads: 4 tiles of 128 tokens a wave, the second wave ending at
    1,024 tokens; after a 120k prefix the 1,025th token costs half as much attention again (measured: 0.17 s for
    1,012 tokens, 0.22 s for 1,043)."""
    cost, smooth = StepCost.for_model(LLAMA8B, 0.2, 132), StepCost.for_model(LLAMA8B, 0.2)
    assert [cost.waves(n) for n in (1, 512, 513, 1024, 1025, 1536, 1537)] == [1, 1, 2, 2, 3, 3, 4]
    attention = cost.flops(1024, 120_000) - 1024 * cost.linear
    assert attention == pytest.approx(
        1056 / 1024 * (smooth.flops(1024, 120_000) - 1024 * cost.linear)
    )
    assert cost.flops(1025, 120_000) > 1.4 * cost.flops(1024, 120_000)
    # flops a smooth line gives 1,100 tokens: on the GPU those fit the second wave's last token, not more
    assert cost.tokens_within(smooth.flops(1100, 120_000), 120_000) == 1024
    assert smooth.tokens_within(smooth.flops(1100, 120_000), 120_000) == 1100
    assert StepCost.for_model(LLAMA8B, 0.2, 132, tp_size=2).waves(1024) == 1  # 16 heads a rank


def scheduler(cost: StepCost | None, chunk: int = 8192) -> Scheduler:
    layout = KVLayout([PoolSpec("kv", "gpu", 1 << 14, 16, 1, "all")])
    return Scheduler(MemoryManager(layout.pools), layout, chunk_tokens=chunk, cost=cost)


def run_prompt(sched: Scheduler, decoders: int, prompt: int) -> list[int]:
    """The chunk sizes of a `prompt`-token request prefilled while `decoders` requests decode."""
    for rid in range(decoders):
        sched.add(Seq(rid, 16, 10_000), list(range(16)))
    if decoders:
        sched.advance(sched.schedule())
    long = Seq(99, prompt, 8)
    sched.add(long, list(range(1000, 1000 + prompt)))
    chunks = []
    while long.prefilling:
        step = sched.schedule()
        assert len(step.seqs) == decoders + 1  # the decoders ride along in every chunk step
        chunks.append(step.new[step.seqs.index(long)])
        sched.advance(step)
    return chunks


def test_chunks_shrink_with_the_prefix_to_keep_the_step_budget():
    cost = measured()
    chunks = run_prompt(scheduler(cost), decoders=8, prompt=126_000)
    assert sum(chunks) == 126_000
    assert chunks[0] > 4 * chunks[-2] and chunks == sorted(chunks[:-1], reverse=True) + chunks[-1:]
    prefix = 0
    for n in chunks:
        seconds = cost.decode_s + cost.fixed_s + cost.rate * cost.flops(n, prefix)
        assert seconds <= 0.2 + 1e-9 or n == MIN_CHUNK
        prefix += n
    assert chunks[-2] >= 1000  # 0.2 s still holds ~1,100 tokens after 124k


def test_a_steps_fixed_cost_is_fitted_apart_from_its_rate():
    """A later turn's prefill after a cached 64k document costs a step ~0.1 s whatever its rows (tailor reads the
    document's rows once; bench_prefix_prefill: 1 row 106 ms, 16 rows 171 ms). Fitted as seconds per flop alone,
    the 1-row step made every turn cost 0.106 s, so a 0.2 s budget beside 15 decoding users took one turn a step
    (doc chat's turn 3: 1.04 s median TTFT, was 0.42); fitted as a fixed part and a rate, most of the 16 turns
    fit in one step, and a step that also compiled something does not move the line."""
    turn = [(70, 64_000)]
    cost = StepCost.for_model(LLAMA8B, 0.2)
    cost.observe([], 15, 0.031)
    cost.observe(turn, 15, 0.031 + 0.106)
    assert cost.fixed_s == 0 and cost.allowance(True) < 2 * cost.flops(
        *turn[0]
    )  # one row: no line yet
    cost.observe(turn * 16, 0, 0.171)
    cost.observe(turn, 15, 0.031 + 0.106)
    cost.observe(turn * 4, 15, 0.031 + 5.0)  # a step that compiled something
    assert cost.fixed_s == pytest.approx(0.102, abs=0.002)
    assert cost.rate * cost.flops(*turn[0]) == pytest.approx(0.065 / 15, rel=0.01)
    assert 14 * cost.flops(*turn[0]) <= cost.allowance(True) <= 16 * cost.flops(*turn[0])
    shown = cost.describe()  # in /get_server_info
    assert shown["budget_ms"] == 200 and shown["decode_ms"] == pytest.approx(31)
    assert shown["fixed_ms"] == pytest.approx(cost.fixed_s * 1e3) and shown["tflops"] > 0
    assert shown["opening_ms"] == 0  # no step opened a request beside decoders


def test_a_line_resting_on_one_unlike_step_grows_chunks_a_quarter_at_a_time():
    """The H100's tailor run beside 8 users (2026-12-05): budget-sized chunks all do about the same work, so the
    line's slope rested on the one small chunk that was slow (here one that also captured a graph). Its 0.1 s fixed
    part and a quarter of the true rate sized a later chunk at 8,184 tokens (0.40 s). The true cost below: 18 ms of
    decode and 1.8e-15 s a flop (~560 TFLOP/s)."""
    cost = StepCost.for_model(LLAMA8B, 0.2)
    true = lambda chunks: 0.018 + 1.8e-15 * sum(cost.flops(*c) for c in chunks)  # noqa: E731
    cost.observe([], 8, 0.018)
    cost.observe([(300, 32_468)], 8, 0.13)
    prefix, seconds = 0, []
    for n in (4729, 3798, 3841, 3328, 3271, 3019):  # the run's first chunks of the 126k prompt
        cost.observe([(n, prefix)], 8, true([(n, prefix)]))
        prefix += n
    fixed_s, rate = cost.fit()
    assert fixed_s > 0.08 and rate < 0.5e-15  # the line
    line_tokens = cost.tokens_within((0.2 - 0.018 - fixed_s) / rate, prefix)
    assert true([(line_tokens, prefix)]) > 0.3  # what it alone would have allowed
    for _ in range(20):
        n = cost.tokens_within(cost.allowance(True), prefix)
        seconds.append(true([(n, prefix)]))
        cost.observe([(n, prefix)], 8, seconds[-1])
        prefix += n
    assert max(seconds) <= 0.018 + GROWTH * 0.182 and max(seconds) < 0.25


def test_without_decoders_or_a_budget_chunks_are_the_configured_size():
    assert run_prompt(scheduler(measured(), chunk=2048), 0, 10_000) == [2048] * 4 + [1808]
    assert run_prompt(scheduler(None, chunk=2048), 3, 10_000) == [2045] * 4 + [1820]


def test_a_spent_budget_admits_no_second_prompt_and_the_first_still_advances():
    cost = measured(budget_s=0.001)  # less than a decode step: only the first prompt's MIN_CHUNK
    sched = scheduler(cost)
    sched.add(Seq(0, 16, 100), list(range(16)))
    sched.advance(sched.schedule())
    for rid in (1, 2):
        sched.add(Seq(rid, 5000, 8), list(range(rid * 10_000, rid * 10_000 + 5000)))
    step = sched.schedule()
    assert [s.rid for s in step.seqs] == [0, 1] and step.new == [1, MIN_CHUNK]
    assert [s.rid for s in sched.waiting] == [2]


def test_greedy_tokens_do_not_depend_on_the_budget():
    """tailor, a 1 us budget on the CPU: the long prompt prefills MIN_CHUNK tokens a step beside a decoding
    request instead of all at once; both requests' tokens equal those the same engine gives without a budget. The
    cost model hears which steps opened a request's prefill."""
    prompts = [list(range(100, 164)), list(range(2000, 2600))]
    outs, opened = [], []
    with Engine(
        "dummy:tiny",
        kv_policy="tailor",
        step_budget_ms=1e-3,
        enable_prefix_caching=False,
        progress=False,
        quant_layers=[0],
        kv_cache_gib=0.25,
    ) as e:
        cost = e.scheduler.cost
        observe = cost.observe
        cost.observe = lambda chunks, decoding, seconds, opens: (
            chunks and opened.append(opens),
            observe(chunks, decoding, seconds, opens),
        )
        for budget in (None, cost):
            e.scheduler.cost = budget
            first = e.add_request(prompts[0], SamplingParams(max_new_tokens=12, temperature=0))
            e.step()
            long = e.add_request(prompts[1], SamplingParams(max_new_tokens=4, temperature=0))
            steps = 0
            while not long.output_ids:
                e.step()
                steps += 1
            while not (first.finished and long.finished):
                e.step()
            outs.append((first.output_ids, long.output_ids, steps))
    assert outs[0][:2] == outs[1][:2]
    assert outs[0][2] == 1 and outs[1][2] == math.ceil(600 / MIN_CHUNK)
    assert opened == [
        True,
        True,
        False,
        False,
    ]  # the first prompt's one chunk, then the long one's three


def test_next_turns_after_a_cached_document_join_one_step_beside_a_decoder():
    """The scheduler with a cached document and a request decoding: fitted to a later turn's step times (0.1 s a
    step whatever its rows, 4 ms a row more), 15 next turns join one step; fitted per flop from the 1-row step
    alone, about one does."""
    doc = list(range(3000, 3512))  # two 256-token prefix blocks
    turns = [doc + list(range(i * 100, i * 100 + 70)) for i in range(15)]
    joined = []
    with Engine(
        "dummy:tiny", kv_policy="tailor", progress=False, quant_layers=[0], kv_cache_gib=0.25
    ) as e:
        e.generate(
            input_ids=doc + [1], sampling_params={"max_new_tokens": 1}
        )  # caches the document
        for rows in (1, 16):
            cost = e.scheduler.cost = StepCost.for_model(e.config, 0.2)
            turn = [(70, len(doc))]
            cost.observe([], 1, 0.03)
            cost.observe(turn, 1, 0.03 + 0.106)
            if rows == 16:
                cost.observe(turn * 16, 0, 0.171)
            cost.observe = lambda *a: None  # the CPU's step times are not the GPU's
            e.add_request(
                doc + [2], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
            )
            e.step()  # it decodes from now on
            for ids in turns:
                e.add_request(ids, SamplingParams(max_new_tokens=1, temperature=0))
            e.step()
            joined.append(len(turns) - len(e.scheduler.waiting))
            while e.scheduler.has_work:
                e.step()
    assert joined[0] <= 2 and joined[1] == 15


def test_a_step_that_opens_a_request_beside_decoders_leaves_its_learned_excess_out_of_the_budget():
    """On the H100 tailor's first chunk of a 126k prompt beside 8 users took 17-37 ms more than predicted in three
    runs (0.239 s for 6,085 tokens, predicted 0.202, in the last), its later chunks less. The excess over the line
    of the steps that opened a request beside decoders is learned (at least 0) and left out of the next such step's
    budget; steps that open none keep all of it."""
    cost = StepCost.for_model(LLAMA8B, 0.2)
    true = lambda chunks, opens: (  # noqa: E731
        0.018 + 1.8e-15 * sum(cost.flops(*c) for c in chunks) + 0.04 * opens
    )
    cost.observe([], 8, 0.018)
    prefix = 40_000
    for n in (3000, 5000, 2000, 4000):  # later chunks of a prompt: on the line
        cost.observe([(n, prefix)], 8, true([(n, prefix)], False))
        prefix += n
    assert cost.opening_s == 0 and cost.opening_flops() == 0
    n = cost.tokens_within(cost.allowance(True), 0)
    assert true([(n, 0)], True) > 0.235  # the first opening, sized on the line alone
    cost.observe([(n, 0)], 8, true([(n, 0)], True), opens=True)
    assert cost.opening_s == pytest.approx(0.04, abs=0.002)
    n = cost.tokens_within(cost.allowance(True) - cost.opening_flops(), 0)
    assert 0.19 < true([(n, 0)], True) <= 0.2
    cost.observe([(4000, 0)], 0, 0.1, opens=True)  # nobody decoded: not an opening beside decoders
    assert len(cost._opening) == 1
    spiky = StepCost.for_model(
        LLAMA8B, 0.2
    )  # one opening that also compiled something: at most a quarter
    spiky.observe([], 8, 0.018)
    spiky.observe([(3000, 40_000)], 8, true([(3000, 40_000)], False))
    spiky.observe([(3000, 0)], 8, 5.0, opens=True)
    assert spiky.opening_s == pytest.approx(0.05)
    # the scheduler: a request that opens beside decoders gets the allowance less its opening cost
    sched = scheduler(cost)
    chunks = run_prompt(sched, decoders=8, prompt=126_000)
    assert chunks[0] == cost.tokens_within(cost.allowance(True) - cost.opening_flops(), 0)
    assert chunks[1] > chunks[0]  # its second chunk opens nothing


@pytest.mark.parametrize("budget_s", [0.2, 0.225, 0.25])
@pytest.mark.parametrize("long_at", [20_000, 100_000])
def test_no_step_carries_a_request_with_no_tokens_to_compute(budget_s, long_at):
    """H100, 2026-12-05: a long prompt's chunk ended at a wave, its step's budget had flops left for a waiting
    prompt's first tokens, and that prompt's opening cost then left it none; admitted with no tokens, tailor's
    prefill failed on the empty chunk. A prompt that cannot compute a token after its opening cost waits."""
    cost = StepCost.for_model(LLAMA8B, budget_s, 132)
    line = lambda chunks, opens=0.0: 0.018 + 1.8e-15 * sum(cost.flops(*c) for c in chunks) + opens  # noqa: E731
    cost.observe([], 8, 0.018)
    for chunk in ((3000, 40_000), (5000, 43_000), (2000, 48_000)):
        cost.observe([chunk], 8, line([chunk]))
    cost.observe([(3000, 0)], 8, line([(3000, 0)], 0.04), opens=True)
    assert cost.opening_flops() > 0
    sched = scheduler(cost)
    for rid in range(8):
        sched.add(Seq(rid, 16, 10_000), list(range(16)))
    sched.advance(sched.schedule())
    long = Seq(50, 126_000, 8)
    sched.add(long, list(range(1000, 127_000)))
    while long.num_computed < long_at:
        sched.advance(sched.schedule())
    sched.add(Seq(60, 32768, 8), list(range(200_000, 232_768)))
    for _ in range(3):
        step = sched.schedule()
        assert all(step.new), step.new
        sched.advance(step)


def test_a_slow_decode_step_before_the_prompts_does_not_hold_their_chunks_at_the_minimum():
    """H100, 2026-12-05: a server's only decode-only step before six 128k prompts arrived at once captured graphs
    (seconds); no decode-only step ran while they prefilled, so the budget left every step the minimum chunk: 2,540
    steps of 256 tokens in ~80 ms. A step that prefills beside decoders in less time bounds the decode time."""
    cost = StepCost.for_model(LLAMA8B, 0.2, 132)
    cost.observe([], 1, 2.0)  # one decode step that captured graphs
    cost.observe([(130_000, 0)], 0, 11.4)  # the first prompt, alone
    true = lambda n, p: 0.015 + 1.8e-15 * cost.flops(n, p)  # noqa: E731
    sched = scheduler(cost)
    sched.add(Seq(0, 16, 10_000), list(range(16)))
    sched.advance(sched.schedule())
    long = Seq(1, 130_000, 8)
    sched.add(long, list(range(1000, 131_000)))
    chunks = []
    while long.prefilling and len(chunks) < 40:
        step = sched.schedule()
        n, prefix = step.new[step.seqs.index(long)], long.num_computed
        chunks.append(n)
        sched.advance(step)
        cost.observe([(n, prefix)], 1, true(n, prefix), opens=prefix == 0)
    assert chunks[0] == MIN_CHUNK and max(chunks) > 2000
    assert cost.decode_s < 0.2
