"""Requests that reach the server together prefill together: a step that would only prefill waits for requests
still being tokenized (AsyncEngine.arriving), at most gather_s."""

import asyncio
import time

from tailorkv.engine.async_engine import DELAY_FACTOR
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


def test_requests_submitted_a_little_apart_prefill_in_one_step(live_server):
    """No request is arriving when A is submitted, B is submitted 50 ms later: within delay_factor x the last
    prefill's time of the latest submission, the step is held for more. (Two prompts finished before them: one
    would count A as its next turn, all in, and end the hold.)"""
    engine = live_server.async_engine
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    ids = engine.engine.tokenize

    async def scenario():
        async for _ in engine.generate(
            [(ids("Prompts first, to time a prefill step", None), params)] * 2
        ):
            pass
        a = engine.generate([(ids("The first request", None), params)])
        await asyncio.sleep(0.05)
        b = engine.generate([(ids("The second request, a little later", None), params)])
        first = [await anext(a), await anext(b)]
        for stream in (a, b):
            async for _ in stream:
                pass
        return first[0].time, first[1].time

    factor, engine.delay_factor = (
        engine.delay_factor,
        100.0,
    )  # held up to gather_s after the latest submission
    try:
        a, b = asyncio.run(scenario())
    finally:
        engine.delay_factor = factor
    assert a == b


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


def test_a_request_whose_body_is_still_coming_is_waited_for(live_server, monkeypatch):
    """Over HTTP: B's headers are in but its body comes 0.2 s later, after A was submitted; A is held for B (it
    was arriving since its headers), and both get their first token from one step. The stall limit is raised
    for this test: on a loaded 2-core machine 0.2 s of sleep can pass 0.25 s (test_slow_clients covers it)."""
    import json
    import socket
    import threading
    from urllib.parse import urlparse

    import httpx

    from tailorkv.api import server

    monkeypatch.setattr(server, "STALL_S", 10.0)
    engine = live_server.engine
    live_server.wait_idle()
    firsts: list[list[int]] = []  # per step, the requests that got their first token in it
    step = engine.step

    def recording_step(admit=True):
        done = step(admit)
        firsts.append([r.rid for r in done if len(r.output_ids) == 1])
        return done

    body = json.dumps(
        {"text": "The request whose body is late", "sampling_params": {"max_new_tokens": 2}}
    ).encode()
    url = urlparse(live_server.url)
    engine.step = recording_step
    try:
        with socket.create_connection((url.hostname, url.port)) as late:
            late.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            )
            time.sleep(0.05)  # the server has B's headers
            first = {}
            a = threading.Thread(
                target=lambda: first.update(
                    httpx.post(
                        f"{live_server.url}/generate",
                        json={
                            "text": "The first request",
                            "sampling_params": {"max_new_tokens": 2},
                        },
                        timeout=60,
                    ).json()
                )
            )
            a.start()
            time.sleep(0.2)
            late.sendall(body)
            reply = b""
            while chunk := late.recv(65536):
                reply += chunk
            a.join()
    finally:
        del engine.step
    b = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    rid_a, rid_b = int(first["meta_info"]["id"]), int(b["meta_info"]["id"])
    assert sorted([rid_a, rid_b]) in [sorted(f) for f in firsts]


def _decode_then_join(engine, delay_factor: float) -> tuple[list[float], float, float]:
    """A decodes; B is submitted while it does. Returns (the times of A's outputs, B's submission, B's first
    output)."""
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    long = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    ids = engine.engine.tokenize

    async def scenario():
        a = engine.generate([(ids("A request that decodes for a while", None), long)])
        a_times = [(await anext(a)).time for _ in range(3)]
        submitted = time.perf_counter()
        b = engine.generate([(ids("A request that comes while it decodes", None), params)])
        b_first = (await anext(b)).time
        a_times += [out.time async for out in a]
        async for _ in b:
            pass
        return a_times, submitted, b_first

    factor, engine.delay_factor = engine.delay_factor, delay_factor
    try:
        return asyncio.run(scenario())
    finally:
        engine.delay_factor = factor


def test_a_request_coming_while_others_decode_waits_the_delay(live_server):
    """vLLM's rule: B joins A's steps once it has waited delay_factor x the last prefill step's time; A decodes
    meanwhile. With factor 0 B joins at once; with a factor whose delay outlasts A, once A has finished."""
    engine = live_server.async_engine
    live_server.wait_idle()
    a_times, submitted, b_first = _decode_then_join(engine, 0.0)
    assert sum(submitted < t < b_first for t in a_times) <= 1 and a_times[-1] > b_first
    a_times, submitted, b_first = _decode_then_join(engine, 1e6)
    assert sum(submitted < t < b_first for t in a_times) > 20 and a_times[-1] < b_first


def test_a_prefill_is_held_after_requests_finish_for_their_next_turns(live_server):
    """B comes while A decodes its last tokens and waits (the delay); A finishes; C (A's user's next turn) comes
    after B's delay has run out but within the delay after A finished: B and C prefill in one step."""
    engine = live_server.async_engine
    live_server.wait_idle()
    ids = engine.engine.tokenize
    delay = 2.0  # A's last 3 steps fit it with room on a loaded 2-core host (1.0 with 5 steps did not, at ~0.25 s a step)
    log = engine.engine.step_log
    record = log.record

    def fixed(*args):  # every prefill step counts as 1 s: the delay is delay_factor seconds
        record(*args)
        log.prefill_seconds = 1.0

    async def scenario():
        a = engine.generate(
            [
                (
                    ids("A request near its end", None),
                    SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True),
                )
            ]
        )
        await anext(a)
        b_came = time.perf_counter()
        b = engine.generate(
            [(ids("The first next turn", None), SamplingParams(max_new_tokens=2, temperature=0))]
        )
        a_end = [out.time async for out in a][-1]
        assert a_end < b_came + delay, "A ran past B's delay: B was admitted beside it"
        await asyncio.sleep(max(b_came + delay + (a_end - b_came) / 2 - time.perf_counter(), 0))
        c = engine.generate(
            [(ids("The second next turn", None), SamplingParams(max_new_tokens=2, temperature=0))]
        )
        firsts = [(await anext(b)).time, (await anext(c)).time]
        for stream in (b, c):
            async for _ in stream:
                pass
        return firsts

    engine.delay_factor, engine.gather_s, log.record = delay, 5.0, fixed
    try:
        b_first, c_first = asyncio.run(scenario())
    finally:
        engine.delay_factor, engine.gather_s = DELAY_FACTOR, 0.5
        del log.record
    assert b_first == c_first


def test_the_hold_ends_once_the_finished_requests_next_turns_are_in(live_server):
    """A and B finish in one step; their next turns C and D come 50 ms apart: they prefill in one step at once,
    not after the delay (1 s here) since D came."""
    engine = live_server.async_engine
    live_server.wait_idle()
    ids = engine.engine.tokenize
    log = engine.engine.step_log
    record = log.record
    turn = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)

    def fixed(*args):  # every prefill step counts as 1 s: the delay is delay_factor seconds
        record(*args)
        log.prefill_seconds = 1.0

    async def scenario():
        ab = engine.generate(
            [
                (ids("The first user's turn", None), turn),
                (ids("The second user's turn", None), turn),
            ]
        )
        ends = [out.time async for out in ab if out.finished]
        assert len(set(ends)) == 1
        c = engine.generate([(ids("The first user's next turn", None), turn)])
        await asyncio.sleep(0.05)
        d_came = time.perf_counter()
        d = engine.generate([(ids("The second user's next turn", None), turn)])
        firsts = [(await anext(c)).time, (await anext(d)).time]
        for stream in (c, d):
            async for _ in stream:
                pass
        return firsts, d_came

    engine.delay_factor, engine.gather_s, log.record = 1.0, 5.0, fixed
    try:
        (c_first, d_first), d_came = asyncio.run(scenario())
    finally:
        engine.delay_factor, engine.gather_s = DELAY_FACTOR, 0.5
        del log.record
    assert c_first == d_first and d_first - d_came < 0.7


def test_the_hold_after_a_finish_waits_the_clients_turnaround(live_server):
    """Two users' turns finish in one step and their next turns come 1 s later, twice (the engine learns that
    turnaround, whatever it estimated before). Then A's user finishes a step before B's and sends its next turn at
    once (the estimate halves); it waits while B decodes its last token and then, the engine idle, for B's next
    turn, which comes 0.5 s after B finished: later than the delay (0.35 s) after B's finish, but within it after
    the turnaround. They prefill in one step."""
    engine = live_server.async_engine
    live_server.wait_idle()
    ids = engine.engine.tokenize
    log = engine.engine.step_log
    record = log.record

    def fixed(*args):  # every prefill step counts as 1 s: the delay is delay_factor seconds
        record(*args)
        log.prefill_seconds = 1.0

    def turn(text: str, tokens: int):
        return engine.generate(
            [
                (
                    ids(text, None),
                    SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True),
                )
            ]
        )

    async def drain(stream):
        return [out async for out in stream]

    async def scenario():
        for n in range(2):
            both = engine.generate(
                [
                    (
                        ids(f"User {u}'s turn {n}", None),
                        SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
                    )
                    for u in "AB"
                ]
            )
            await drain(both)
            await asyncio.sleep(1.0)
        a, b = turn("A's second turn", 3), turn("B's second turn", 4)  # A ends a step before B
        await drain(a)
        a3 = turn("A's third turn", 2)
        b_end = (await drain(b))[-1].time
        await asyncio.sleep(max(b_end + 0.5 - time.perf_counter(), 0))
        b3_came = time.perf_counter()
        b3 = turn("B's third turn", 2)
        firsts = [(await anext(a3)).time, (await anext(b3)).time]
        await drain(a3)
        await drain(b3)
        return firsts, b3_came

    engine.delay_factor, engine.gather_s, log.record = DELAY_FACTOR, 5.0, fixed
    try:
        (a_first, b_first), b3_came = asyncio.run(scenario())
    finally:
        engine.gather_s = 0.5
        del log.record
    assert a_first == b_first > b3_came
