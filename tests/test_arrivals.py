"""Requests that reach the server together prefill together: a step that would only prefill waits for requests
still being tokenized (AsyncEngine.arriving), at most gather_s."""
import asyncio
import time

from tailorkv.engine.sampling import SamplingParams


async def _first_output_times(async_engine, hold_s: float) -> tuple[float, float, float]:
    """Submit A while B is arriving, B `hold_s` later; (A's first output, B's first output, B's submission)."""
    ids = async_engine.engine.tokenize
    params = SamplingParams(max_new_tokens=2, temperature=0)
    with async_engine.arriving():
        a = async_engine.generate([(ids("The first request", None), params)])
        await asyncio.sleep(hold_s)
        submitted = time.perf_counter()
        b = async_engine.generate([(ids("The second request, a little later", None), params)])
    first = [await anext(a), await anext(b)]
    for stream in (a, b):
        async for _ in stream:
            pass
    return first[0].time, first[1].time, submitted


def test_requests_arriving_together_prefill_in_one_step(live_server):
    a, b, submitted = asyncio.run(_first_output_times(live_server.async_engine, 0.2))
    assert a == b > submitted  # one step produced both first tokens, after B was submitted


def test_the_wait_for_arrivals_is_bounded(live_server):
    engine = live_server.async_engine
    a, b, submitted = asyncio.run(_first_output_times(engine, engine.gather_s + 1.0))
    assert a < submitted < b  # A did not wait for a B that took longer than gather_s to arrive


def test_requests_arriving_after_the_hold_began_do_not_prolong_it(live_server):
    """B was arriving when A could first be prefilled, C began only later: once B is in, A and B prefill together
    without waiting for C (so a steady stream of arrivals never holds a step for long)."""
    engine = live_server.async_engine
    ids = engine.engine.tokenize
    params = SamplingParams(max_new_tokens=2, temperature=0)

    async def scenario():
        b_arriving, c_arriving = engine.arriving(), engine.arriving()
        b_arriving.__enter__()
        a = engine.generate([(ids("The first request", None), params)])
        await asyncio.sleep(0.1)  # the engine holds A for B
        c_arriving.__enter__()
        await asyncio.sleep(0.1)
        b = engine.generate([(ids("The second request", None), params)])
        b_arriving.__exit__(None, None, None)
        submitted = time.perf_counter()
        firsts = [await anext(a), await anext(b)]
        c_arriving.__exit__(None, None, None)
        for stream in (a, b):
            async for _ in stream:
                pass
        return firsts[0].time, firsts[1].time, submitted

    gather_s, engine.gather_s = engine.gather_s, 30.0  # were C waited for, A would wait 30 s
    try:
        a, b, submitted = asyncio.run(scenario())
    finally:
        engine.gather_s = gather_s
    assert a == b and a - submitted < 10
