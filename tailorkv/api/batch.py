"""BatchRun: the requests of one HTTP call on the AsyncEngine, and what each has produced so far."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..engine.async_engine import Output
from ..engine.request import Request as EngineRequest
from ..engine.request import RequestOptions
from ..engine.sampling import SEED_BOUND, SamplingParams
from .protocol import APIError
from .state import AppState

DISCONNECT_POLL_S = 0.25


@dataclass
class Completion:
    """One request's output so far, rebuilt from its Outputs."""

    prompt_tokens: int
    request: EngineRequest | None = None  # known from its first Output on
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    last_time: float | None = None

    def add(self, out: Output) -> None:
        self.request = out.request
        self.text += out.text
        self.output_ids += out.token_ids
        self.finished, self.error, self.last_time = out.finished, out.error, out.time

    @property
    def finish_reason(self) -> dict | None:
        return self.request.finish_reason if self.finished else None

    def sglang(self, token_text: Callable[[int], str] | None = None) -> dict:
        """The SGLang /generate body: cumulative text and ids, meta_info (with logprobs when asked, their token
        texts from `token_text`)."""
        req = self.request
        return {
            "text": self.text,
            "output_ids": list(self.output_ids),
            "meta_info": {
                "id": req.external_id or str(req.rid),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.output_ids),
                "cached_tokens": req.seq.cached_tokens,
                "finish_reason": self.finish_reason,
                "e2e_latency": self.last_time - req.created,
                "queue_time": req.queue_time,
            }
            | req.logprobs_info(len(self.output_ids), token_text),
        }


async def submit(
    state: AppState,
    request: Request,
    tokenize: Callable[[], list[list[int]]],
    params: Callable[[int, list[int]], SamplingParams],
    options: Callable[[int], RequestOptions] = lambda _: RequestOptions(),
) -> BatchRun:
    """Tokenize one call's prompts off the event loop (a long prompt takes a while, and the loop streams other
    requests' tokens meanwhile), compile their grammars off it too, then submit them with params(index, ids) and
    options(index); a prompt whose params ask for n completions becomes n requests, next to each other
    (`parallel`). The call was arriving for the engine since its headers came (server.Arrivals), so that calls
    reaching the server together prefill together; its arrival ends here."""
    try:
        prompts = await run_in_threadpool(tokenize)
        batch, opts = [], []
        for i, prompt in enumerate(prompts):
            for j, p in enumerate(parallel(params(i, prompt))):
                batch.append((prompt, p))
                opts.append(dataclasses.replace(options(i), copy=j > 0))
        await state.engine.compile_grammars([p for _, p in batch])
        return BatchRun(state, batch, opts)
    finally:
        request.state.arrived()


def parallel(p: SamplingParams) -> list[SamplingParams]:
    """n=1 params for each of p.n completions; a seeded one's j-th copy draws with seed + j (all differ)."""
    if p.n == 1:
        return [p]
    seeds = [None if p.seed is None else (p.seed + j) % SEED_BOUND for j in range(p.n)]
    return [dataclasses.replace(p, n=1, seed=seed) for seed in seeds]


class BatchRun:
    """Submitting happens in the constructor, so a refused request (InvalidRequestError, CapacityError) raises
    before any response starts. Iterate for Outputs as they come (then `aclose`), or `wait` for the end."""

    def __init__(
        self,
        state: AppState,
        batch: list[tuple[list[int], SamplingParams]],
        options: list[RequestOptions] | None = None,
    ):
        self.completions = [Completion(len(ids)) for ids, _ in batch]
        self._metrics = state.metrics
        self._outputs = state.engine.generate(batch, options)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        out = await self._outputs.__anext__()
        c = self.completions[out.index]
        if out.error is None:
            self._metrics.observe(out, c.last_time)
        c.add(out)
        return out

    async def aclose(self) -> None:
        """Abort the requests that have not finished."""
        await self._outputs.aclose()

    async def wait(self, request: Request) -> list[Completion]:
        """Run to the end; aborts everything if the client disconnects; a failed request raises a 500."""
        task = asyncio.ensure_future(self._drain())
        try:
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    raise APIError(
                        499, "the client closed the request", code="client_closed_request"
                    )
        finally:
            task.cancel()
            await self.aclose()  # no-op when all finished
        task.result()
        for c in self.completions:
            if c.error:
                raise APIError(500, c.error, type="server_error", code="engine_error")
        return self.completions

    async def _drain(self) -> None:
        async for _ in self:
            pass
