"""POST /generate, SGLang's native API: text or input_ids (one or a batch), sampling_params, stream."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request

from ..engine.sampling import SamplingParams
from .batch import BatchRun, submit
from .protocol import GenerateRequest, error_body
from .sse import DONE, EventStream, sse
from .state import get_state

router = APIRouter()


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    state = get_state(request)
    tokenize = state.engine.tokenize
    prompts = body.prompts()
    run = await submit(
        state,
        request,
        lambda: [tokenize(text, ids) for text, ids in prompts],
        lambda i, _: SamplingParams.from_any(body.params(i), state.engine.input_limits),
        body.options(len(prompts)).__getitem__,
    )
    several = body.batched or len(run.completions) > 1  # a batch, or n > 1: a list
    text = state.engine.token_text if body.return_text_in_logprobs else None
    if body.stream:
        return EventStream(_chunks(run, several, text), run)
    results = [c.sglang(text) for c in await run.wait(request)]
    return results if several else results[0]


async def _chunks(run: BatchRun, several: bool, text: Callable[[int], str] | None):
    """One event per step of each request, with its cumulative text and meta_info (as SGLang streams), then
    [DONE]."""
    async for out in run:
        if out.error:
            yield sse(error_body(out.error, "server_error", "engine_error"))
            continue
        chunk = run.completions[out.index].sglang(text)
        if several:
            chunk["index"] = out.index
        yield sse(chunk)
    yield DONE
