"""Chaos on a real server (issue 20), `full` and `tailor`: 16 greedy requests (8 on `tailor`, whose steps cost
more) keep their tokens while every kind of bad request arrives at the same moment; each bad one gets a 4xx or
completes, none a 500, and every page is free again afterwards. On `tailor`, whose generated-token pool holds a few
answers, a chat request without max_tokens runs to its stop or the pool's end."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import GENERATE_PROMPTS, GREEDY_TOKENS, start_uvicorn

from tailorkv.api.server import create_app
from tailorkv.engine.async_engine import AsyncEngine
from tailorkv.engine.engine import Engine

GREEDY = {"max_new_tokens": GREEDY_TOKENS, "temperature": 0}
PROMPT = GENERATE_PROMPTS[0]


def bad_requests() -> list[tuple[str, dict | bytes, set[int]]]:
    """(route, JSON body or raw bytes, the statuses it may get)."""

    def generate(**extra):
        return "/generate", {"text": PROMPT, "sampling_params": {**GREEDY, **extra}}

    return [
        (*generate(temperature=1e-40), {200}),
        (*generate(temperature=1e-45), {200}),
        (*generate(top_p=1e-30, temperature=0.7), {200}),
        (*generate(seed=2**64, temperature=0.7), {400}),
        (*generate(stop=[f"s{i}" for i in range(100_000)]), {400}),
        (
            "/generate",
            json.dumps({"text": "hi \ud800", "sampling_params": GREEDY}).encode(),  # "\\ud800"
            {400},
        ),
        ("/generate", b'{"text": "' + b"a" * (50 << 20) + b'"}', {413}),  # 50 MB
    ]


def chaos(url: str, expected: dict[str, str]) -> None:
    def good(prompt: str) -> str:
        r = http.post(f"{url}/generate", json={"text": prompt, "sampling_params": GREEDY})
        assert r.status_code == 200, r.text[:300]
        return r.json()["text"]

    def bad(route: str, body, statuses: set[int]) -> None:
        try:
            if isinstance(body, bytes):
                r = http.post(
                    f"{url}{route}", content=body, headers={"content-type": "application/json"}
                )
            else:
                r = http.post(f"{url}{route}", json=body)
        except httpx.WriteError:  # the server answered 413 and closed before the 50 MB were sent
            assert statuses == {413}
            return
        assert r.status_code in statuses, (route, r.status_code, r.text[:300])
        assert r.status_code == 200 or "error" in r.json()

    prompts = list(expected)
    # the threads share one client: each new one loads the CA bundle (~55 ms of CPU)
    with httpx.Client(timeout=300) as http, ThreadPoolExecutor(len(prompts) + 8) as pool:
        idle = http.get(f"{url}/get_server_info").json()["memory"]
        bads = [pool.submit(bad, *b) for b in bad_requests()]
        goods = pool.map(good, prompts)
        assert list(goods) == [expected[p] for p in prompts]
        for f in bads:
            f.result()
        info = http.get(f"{url}/get_server_info").json()
    assert info["num_running_reqs"] == info["num_queued_reqs"] == 0 and info["memory"] == idle


def test_chaos_on_full(live_server):
    live_server.wait_idle()
    chaos(live_server.url, {p: live_server.expected[p] for p in GENERATE_PROMPTS})


@pytest.fixture(scope="module")
def tailor_server():
    engine = Engine(kv_policy="tailor", progress=False, kv_cache_gib=0.4, host_kv_gib=0.5)
    prompts = GENERATE_PROMPTS[:8]
    outs = engine.generate(prompts, sampling_params=GREEDY)
    async_engine = AsyncEngine(engine)
    url, stop = start_uvicorn(create_app(async_engine))
    yield url, engine, {p: o["text"] for p, o in zip(prompts, outs)}
    stop()
    async_engine.shutdown()


def test_chaos_on_tailor(tailor_server):
    url, _, expected = tailor_server
    chaos(url, expected)


def test_chat_without_max_tokens_on_tailor_runs_to_its_stop_or_the_pool_end(tailor_server):
    url, engine, _ = tailor_server
    pool = engine.max_output(50)
    assert pool < engine.config.max_position // 4  # a pool of a few answers, not the context
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "default",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text[:300]
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] in ("stop", "length") and usage["completion_tokens"] > 0
    assert usage["completion_tokens"] <= engine.max_output(usage["prompt_tokens"])
