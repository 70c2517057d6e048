"""Shared fixtures: a real uvicorn server on loopback, serving the embedded default model from a thread.

The fixture engine first answers a fixed set of prompts offline (greedy), before its step loop starts; the
load tests hold the server's streamed outputs equal to those.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core (make test: -n 2): a second intra-op thread per worker only contends for the same cores
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and in the processes the tests start

if not torch.cuda.is_available():
    # before anything imports triton (torch.nn.attention.bias does): triton decorates its own tl.* helpers once,
    # in the mode the flag gives at that import, and the kernel tests run them in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_the_language_once_per_launch() -> None:
    """The Triton interpreter (3.9) patches triton.language's builtins (inspect.getmembers over tl, tl.core,
    tl.math, tl.tensor: ~0.35 ms) at every call of a @triton.jit helper inside a kernel, on top of the patch
    the launch itself made and keeps until the grid ends; a kernel calling helpers in a loop spent a third of
    its interpreted time there. Within one launch a second patch of the same modules sets the same wrappers
    again (the builtins are already replaced, so it only re-scans), so a helper whose modules this launch has
    patched already runs without it; the first helper from other modules (triton's own tl.core ones) patches
    as before. The kernels compute the same; only the interpreter's repeated set-up goes."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if not all(hasattr(ti, n) for n in ("GridExecutor", "InterpretedFunction", "InterpreterError")):
        return
    launch_call, helper_call = ti.GridExecutor.__call__, ti.InterpretedFunction.__call__
    patched: list[set[int]] = []  # per running launch: the language modules patched so far
    langs_of: dict[int, frozenset[int]] = {}

    def langs(fn) -> frozenset[int]:
        # what _patch_lang patches for fn: the triton.language modules its globals hold
        key = id(fn.__globals__)
        if key not in langs_of:
            mods = fn.__globals__.values()
            langs_of[key] = frozenset(id(m) for m in mods if m is tl or m is tl.core)
        return langs_of[key]

    def launch(self, *args, **kwargs):
        patched.append(set(langs(self.fn)))
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            patched.pop()

    def helper(self, *args, **kwargs):
        if not patched or not langs(self.fn) <= patched[-1]:
            if patched:
                patched[-1].update(langs(self.fn))
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e

    ti.GridExecutor.__call__ = launch
    ti.InterpretedFunction.__call__ = helper


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()

GREEDY_TOKENS = 16
GENERATE_PROMPTS = [f"Fact {i}: the number {7 * i + 3} is" for i in range(16)]
CHAT_MESSAGES = [
    [{"role": "user", "content": f"Name a colour and the number {i}."}] for i in range(16)
]


@dataclass
class LiveServer:
    url: str
    engine: object  # tailorkv Engine (its step loop runs in async_engine's thread)
    async_engine: object
    expected: dict[
        str, str
    ]  # prompt text (chat: templated) -> greedy completion of GREEDY_TOKENS tokens

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.engine.tokenizer.apply_chat_template(messages)

    def wait_idle(self, timeout: float = 60) -> dict:
        """/get_server_info once nothing runs or waits."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=10) as http:
            while True:
                info = http.get(f"{self.url}/get_server_info").json()
                if (
                    info["num_running_reqs"] == 0
                    and info["num_queued_reqs"] == 0
                    or time.monotonic() > deadline
                ):
                    return info
                time.sleep(0.1)


def forced_logprobs(engine, prompt: str, n: int = 24) -> list[float]:
    """The logprobs of the prompt's last n tokens, each teacher-forced one decode step at a time."""
    ids = engine.tokenizer.encode(prompt)
    return engine.forced([ids[:-n]], [ids[-n:]])[0].output_logprobs


# bf16 on the GPU: another kernel's summation order moved dummy:tiny's logprobs by up to 0.003 (H100, 2026-12-06)
LOGPROB_TOL = 1e-2 if torch.cuda.is_available() else 1e-4


def assert_close_logprobs(got: list[float], want: list[float], tol: float = LOGPROB_TOL) -> None:
    """Exact attention in another summation order: the same logprobs to 1e-4 in float32 (the CPU), 1e-2 in bf16
    (the GPU). Where the math is exact this is the check; greedy tokens of dummy:tiny stay the same under real bugs
    (a layer attending to another layer's rows, a batch row to another row's, a page of a shared document left
    unread)."""
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < tol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, process=None) -> None:
    """Until `url`/health answers 200; fails after `timeout` s, or at once when `process` (a subprocess.Popen
    serving it) has exited (with its stderr's tail when piped). One client polls: each new httpx client loads
    the CA bundle (~55 ms of CPU), which a loop of them takes from the server starting up."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while True:
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if process is not None and process.poll() is not None:
                raise AssertionError(
                    process.stderr.read().decode()[-2000:] if process.stderr else "exited"
                )
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)


def start_uvicorn(app, **config):
    """Serve `app` on a free loopback port from a daemon thread (`config`: more uvicorn.Config settings);
    returns (base url, a function that stops it)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config)
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return url, stop


@pytest.fixture(scope="session", autouse=True)
def plan_cache(tmp_path_factory):
    """Plans calibrated by the tests go to a temporary cache ($XDG_CACHE_HOME/tailorkv/plans), never the user's;
    the tokenizer cache (content-named, bound at import) stays the user's."""
    import tailorkv.engine.tokenizer  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def load_each_model_once():
    """Every Engine of the session serves the same weights and tokenizer per model: load them once (engines only
    read them)."""
    from tailorkv.engine import engine_rank as engine_module

    loaded = {}
    load = engine_module.load_model

    def cached(model, device, dtype, progress=True, tp=None):
        if tp is not None:  # a slice for a tensor-parallel rank
            return load(model, device, dtype, progress, tp)
        key = (model, str(device), dtype)
        if key not in loaded:
            loaded[key] = load(model, device, dtype, progress)
        return loaded[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "load_model", cached)
        yield


@pytest.fixture(scope="session")
def live_server():
    from tailorkv.api.server import create_app
    from tailorkv.engine.async_engine import AsyncEngine
    from tailorkv.engine.engine import Engine

    # the overlap schedule (engine/overlap.py): every API test runs through it; the other servers of the suite
    # (test_serve_tailor, test_chaos, test_router) step by step
    engine = Engine(progress=False, kv_cache_gib=0.25, overlap_schedule=True)
    prompts = GENERATE_PROMPTS + [engine.tokenizer.apply_chat_template(m) for m in CHAT_MESSAGES]
    outs = engine.generate(
        prompts, sampling_params={"max_new_tokens": GREEDY_TOKENS, "temperature": 0}
    )
    expected = {p: o["text"] for p, o in zip(prompts, outs)}
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, served_model_name="smollm2")
    url, stop = start_uvicorn(app)
    yield LiveServer(url, engine, async_engine, expected)
    stop()
    async_engine.shutdown()
