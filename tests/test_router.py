"""Two tailorkv servers behind the real sglang-router (0.3.x, a test-only dependency, cache-aware policy): the
router identifies the served model from the workers' info routes, polls their load, and routes /generate and
/v1/chat/completions (streaming and not) to both."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port, start_uvicorn

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sglang_router") is None, reason="sglang-router is not installed"
)
# `python -m sglang_router.launch_router` less its import of the Python mini load balancer (which imports sglang,
# torch and transformers: 5 s a start): the same arguments, the same Rust router
LAUNCH_ROUTER = """
import argparse, sys
from sglang_router.router import Router
from sglang_router.router_args import RouterArgs

parser = argparse.ArgumentParser()
RouterArgs.add_cli_args(parser, use_router_prefix=False)
args = RouterArgs.from_cli_args(parser.parse_args(sys.argv[1:]), use_router_prefix=False)
args._validate_router_args()
Router.from_args(args).start()
"""


@pytest.fixture(scope="module")
def second_worker(live_server):
    """A second server of the same model (the session's weights, its own engine and KV pages)."""
    from tailorkv.api.server import create_app
    from tailorkv.engine.async_engine import AsyncEngine
    from tailorkv.engine.engine import Engine

    async_engine = AsyncEngine(Engine(progress=False, kv_cache_gib=0.1))
    url, stop = start_uvicorn(create_app(async_engine, served_model_name="smollm2"))
    yield url, async_engine
    stop()
    async_engine.shutdown()


@pytest.fixture(scope="module")
def start_router(live_server, second_worker):
    """start_router(policy) -> the url of a router over both workers, stopped with the module."""
    procs = []

    def start(policy: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH_ROUTER, "--host", "127.0.0.1"]
            + ["--port", str(port), "--policy", policy, "--log-level", "warn"]
            + ["--prometheus-port", str(free_port())]
            + ["--worker-urls", live_server.url, second_worker[0]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=2) as http:  # one client: each new one loads the CA bundle
            while True:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                try:
                    if len(http.get(f"{url}/workers").json()["workers"]) == 2:
                        return url
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                assert time.monotonic() < deadline, "the router did not come up"
                time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def finished(engines) -> list[int]:
    return [e.stats.finished_requests for e in engines]


def test_the_cache_aware_router_identifies_the_model_and_routes(
    start_router, live_server, second_worker
):
    router = start_router("cache_aware")
    workers = httpx.get(f"{router}/workers").json()["workers"]
    assert {w["model_id"] for w in workers} == {"smollm2"} and all(w["is_healthy"] for w in workers)
    assert workers[0]["metadata"]["model_path"] == "SmolLM2-135M-Instruct"
    assert [m["id"] for m in httpx.get(f"{router}/v1/models").json()["data"]] == ["smollm2"]
    engines = [live_server.async_engine, second_worker[1]]
    before = finished(engines)
    with httpx.Client(base_url=router, timeout=120) as c:
        for i in range(4):
            text = f"Request {i}: tell me a story about the number {i * 37}"
            out = c.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 2}})
            assert out.status_code == 200, out.text
            assert out.json()["meta_info"]["completion_tokens"] >= 1
        chat = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
        }
        reply = c.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"], reply.text
        with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert sum(finished(engines)) - sum(before) == 6


def test_requests_reach_both_workers(start_router, live_server, second_worker):
    # (0.3.2's cache-aware tree learns a worker only once it got a request: at low load new prefixes all go to
    # the first worker used; round robin shows both are served)
    router = start_router("round_robin")
    engines = [live_server.async_engine, second_worker[1]]
    before = finished(engines)
    with httpx.Client(base_url=router, timeout=120) as c:
        for i in range(4):
            body = {"text": f"Hello {i}", "sampling_params": {"max_new_tokens": 1}}
            assert c.post("/generate", json=body).status_code == 200
    after = finished(engines)
    assert [a - b for a, b in zip(after, before)] == [2, 2]
    load = httpx.get(f"{second_worker[0]}/get_load").json()
    assert load["load"] == 0 and load["num_reqs"] == 0 and load["num_waiting_reqs"] == 0
