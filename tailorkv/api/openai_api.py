"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions and /v1/chat/completions (n=1)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request

from ..engine.sampling import SamplingParams
from .batch import BatchRun, Completion, submit
from .logprobs import chat_logprobs, completion_logprobs, output_entries, prompt_entries
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest, error_body
from .sse import DONE, EventStream, sse
from .state import AppState, get_state

router = APIRouter(prefix="/v1")
_FINISH = {"stop": "stop", "length": "length"}


@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(get_state(request))]}


@router.get("/models/{model:path}")
async def model(model: str, request: Request):
    state = get_state(request)
    state.check_model(model)
    return _model_card(state)


def _model_card(state: AppState) -> dict:
    return {
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "tailorkv",
        "root": state.model_path,
        "max_model_len": state.engine.context_length,
    }


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    model = state.check_model(body.model)
    tokenize = state.engine.tokenize
    given = body.prompt
    prompts = (
        [given] if isinstance(given, str) or not given or isinstance(given[0], int) else given
    )  # 1 or a batch
    reply = _Reply(False, model, body.n)
    if body.logprobs is not None:
        reply.token_text = state.engine.token_text
    if body.echo:  # as given, or the text of the given ids
        detok = state.engine.detokenize
        reply.echo = [p if isinstance(p, str) else detok(p, False) for p in prompts]
    return await _respond(
        state,
        request,
        body,
        lambda: [tokenize(p, None) if isinstance(p, str) else tokenize(None, p) for p in prompts],
        body.max_tokens,
        reply,
    )


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    model = state.check_model(body.model)
    engine = state.engine
    messages = [m.as_dict() for m in body.messages]
    return await _respond(
        state,
        request,
        body,
        lambda: [engine.tokenize(engine.apply_chat_template(messages), None)],
        body.max_new_tokens,
        _Reply(True, model, body.n, engine.token_text if body.logprobs else None),
    )


async def _respond(
    state: AppState,
    request: Request,
    body: OpenAIRequest,
    tokenize: Callable[[], list[list[int]]],
    max_tokens: int | None,
    reply: _Reply,
):
    run = await submit(
        state,
        request,
        tokenize,
        lambda _, ids: SamplingParams.from_any(
            body.sampling_params(
                max_tokens if max_tokens is not None else state.engine.max_output(len(ids))
            ),
            state.engine.input_limits,
        ),
        lambda _: body.options(),
    )
    if body.stream:
        return EventStream(_chunks(reply, run, body.include_usage), run)
    done = await run.wait(request)
    return reply.body(
        [reply.choice(i, c, c.text, 0, _finish(c), chunk=False) for i, c in enumerate(done)],
        _usage(done),
    )


async def _chunks(reply: _Reply, run: BatchRun, include_usage: bool):
    if reply.chat:  # OpenAI opens each choice of a chat stream with the role
        for index in range(len(run.completions)):
            opening = {"role": "assistant", "content": ""}
            yield sse(
                reply.body(
                    [{"index": index, "delta": opening, "logprobs": None, "finish_reason": None}],
                    chunk=True,
                )
            )
    async for out in run:
        c = run.completions[out.index]
        if out.error:
            yield sse(error_body(out.error, "server_error", "engine_error"))
        elif (
            out.text
            or out.finished
            or (reply.token_text and out.token_ids)
            or (reply.echo and out.index not in reply.opened)
        ):
            finish = _finish(c) if out.finished else None
            begin = len(c.output_ids) - len(out.token_ids)
            choice = reply.choice(out.index, c, out.text, begin, finish, chunk=True)
            yield sse(reply.body([choice], chunk=True))
    if include_usage:
        yield sse(reply.body([], _usage(run.completions), chunk=True))
    yield DONE


@dataclass
class _Reply:
    """The envelope of one response: ids, object names and choice shapes of completions vs chat."""

    chat: bool
    model: str
    n: int = 1  # choices per prompt
    token_text: Callable[[int], str] | None = None  # set when logprobs are asked for
    echo: list[str] | None = None  # completions: each prompt's text, to put before its choices'
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    # choice -> characters its logprobs covered; choices already begun
    offsets: dict[int, int] = field(default_factory=dict)
    opened: set[int] = field(default_factory=set)

    def body(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        obj = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if self.chat
            else "text_completion"
        )
        out = {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def choice(
        self, index: int, c: Completion, text: str, begin: int, finish: str | None, chunk: bool
    ) -> dict:
        """Choice `index` with `text` and the logprobs of its output tokens from `begin` on; a choice's first
        piece starts with its echoed prompt."""
        echo = (
            self.echo[index // self.n]
            if self.echo is not None and index not in self.opened
            else None
        )
        self.opened.add(index)
        text = (echo or "") + text
        out: dict = {"index": index}
        if not self.chat:
            out["text"] = text
        elif chunk:
            out["delta"] = {"content": text} if text else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
        out.update(logprobs=self._logprobs(index, c, begin, echo is not None), finish_reason=finish)
        return out

    def _logprobs(self, index: int, c: Completion, begin: int, echo: bool) -> dict | None:
        if self.token_text is None or c.request is None:
            return None
        entries = output_entries(c.request, begin, len(c.output_ids))
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        if echo:
            entries = prompt_entries(c.request) + entries
        lp = completion_logprobs(entries, self.token_text, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + sum(map(len, lp["tokens"]))
        return lp


def _finish(c: Completion) -> str:
    kind = c.finish_reason["type"]
    return _FINISH.get(kind, kind)


def _usage(done: list[Completion]) -> dict:
    prompt, completion = sum(c.prompt_tokens for c in done), sum(len(c.output_ids) for c in done)
    cached = sum(c.request.seq.cached_tokens for c in done if c.request is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
