"""What routers and clients ask besides generation, as SGLang answers it: health, model and server info, load,
cache flush, abort, tokenize / detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from .. import __version__
from ..engine.sampling import SamplingParams
from .protocol import AbortRequest, APIError, DetokenizeRequest, TokenizeRequest
from .state import AppState, get_state

router = APIRouter()
HEALTH_GENERATE_S = 20.0  # a one-token generation slower than this is unhealthy


def _check_alive(state: AppState) -> None:
    engine = state.engine
    if not engine.alive:
        raise APIError(
            503, "the engine loop is not running", type="server_error", code="engine_down"
        )
    if engine.draining:
        raise APIError(503, "the server is draining", type="server_error", code="draining")


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    _check_alive(get_state(request))
    return {"status": "ok"}


@router.api_route("/health_generate", methods=["GET", "HEAD"])
async def health_generate(request: Request):
    """Healthy when the engine generates one token within HEALTH_GENERATE_S."""
    state = get_state(request)
    _check_alive(state)
    stream = state.engine.generate([([0], SamplingParams(max_new_tokens=1, temperature=0))])

    async def one_token() -> None:
        async for out in stream:
            if out.error:
                raise APIError(503, out.error, type="server_error", code="engine_error")

    try:
        await asyncio.wait_for(one_token(), HEALTH_GENERATE_S)
    except asyncio.TimeoutError:
        raise APIError(
            503, "the engine did not generate a token in time", "server_error", "engine_stalled"
        ) from None
    finally:
        await stream.aclose()
    return {"status": "ok"}


def _model_info(state: AppState) -> dict:
    return {
        "model_path": state.model_path,
        "served_model_name": state.served_model_name,
        "tokenizer_path": state.engine.tokenizer_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "max_context_length": state.engine.context_length,
        "vocab_size": state.engine.vocab_size,
    }


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(request: Request):
    return _model_info(get_state(request))


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(request: Request, context: str | None = None, output_len: str = "0"):
    """`?context=N`: TailorKV's per-layer top_k for a prompt of N tokens (default: the model's context);
    `&output_len=M`: how many requests of N tokens, M of them answer, the KV memory holds at once."""
    state = get_state(request)
    n = None
    limit = state.engine.context_length
    if context is not None:
        if not context.isdigit() or not 1 <= int(context) <= limit:
            raise APIError(400, f"context must be an integer in [1, {limit}], got {context!r}")
        n = int(context)
    if not output_len.isdigit() or int(output_len) >= (n or limit):
        raise APIError(
            400, f"output_len must be an integer in [0, {(n or limit) - 1}], got {output_len!r}"
        )
    return {
        "version": __version__,
        **_model_info(state),
        **state.engine.server_info(n, int(output_len)),
    }


@router.get("/get_load")
async def get_load(request: Request):
    """`load` (what sglang-router reads): requests running or waiting; with SGLang's per-rank fields."""
    load = get_state(request).engine.load()
    running, waiting = load["num_running_reqs"], load["num_queued_reqs"]
    return {
        "load": running + waiting,
        "dp_rank": 0,
        "num_reqs": running,
        "num_waiting_reqs": waiting,
        "memory": load["memory"],
    }


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request):
    """Drop the prefix cache's blocks no running request uses."""
    blocks = await get_state(request).engine.flush_cache()
    return {"message": "Cache flushed.", "flushed_blocks": blocks}


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request):
    """Abort a request by its id (meta_info.id) or all of them; the aborted ones finish with reason abort."""
    engine = get_state(request).engine
    n = engine.end(lambda r: body.abort_all or body.rid in (r.external_id, str(r.rid)))
    return {"aborted": n}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = get_state(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    tokens = [state.engine.tokenize(p, None) for p in prompts]
    return {
        "tokens": tokens[0] if isinstance(body.prompt, str) else tokens,
        "count": len(tokens[0]) if isinstance(body.prompt, str) else [len(t) for t in tokens],
        "max_model_len": state.engine.context_length,
    }


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    text = get_state(request).engine.detokenize(body.tokens, body.skip_special_tokens)
    return {"text": text}
